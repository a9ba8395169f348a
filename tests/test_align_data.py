"""Preference data: the shipped sources, validation of bad records, tokenization and batching."""

from __future__ import annotations

import gzip
import json
import warnings

import pytest
import torch
from _align_helpers import chat_tokenizer

from llmlab.align.data import (
    DataStats,
    PairSource,
    PreferencePair,
    UnpairedSource,
    encode_pairs,
    encode_response,
    load_pairs,
    parse_hh_transcript,
    split_pairs,
)
from llmlab.errors import DataError


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_hh_rlhf_split_and_parse():
    st = DataStats()
    train = load_pairs("hh-rlhf", stats=st)
    held = load_pairs("hh-rlhf-heldout")
    # 2,312 pairs in the file: 2,000 train lines (8 malformed, skipped and counted) and 312 held-out lines.
    assert len(train) == 1992 and st.skipped_invalid == 8 and st.records == 2000
    assert len(held) == 311
    assert {p.where for p in train}.isdisjoint({p.where for p in held})
    p = train[0]
    assert p.prompt[0]["role"] == "user" and p.prompt[-1]["role"] == "user"
    assert p.chosen != p.rejected and "Human:" not in p.chosen


def test_parse_hh_transcript_multi_turn():
    msgs, last = parse_hh_transcript(
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao", "x:1"
    )
    assert msgs == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    assert last == "ciao"
    with pytest.raises(DataError, match="x:1"):
        parse_hh_transcript("no turns here", "x:1")


def test_gsm8k_pairs_are_marked_as_test_contamination():
    with pytest.warns(UserWarning, match="gsm8k-test"):
        pairs = load_pairs("gsm8k-pairs", limit=5)
    assert all(p.contaminates == "gsm8k-test" for p in pairs)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty 'chosen'"),
        ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty 'rejected'"),
        ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty 'prompt'"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "must be a string"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, record, message):
    good = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, record, good])
    with pytest.raises(DataError, match=rf"pairs.jsonl:2: .*{message}"):
        load_pairs(path)
    st = DataStats()
    pairs = load_pairs(path, skip_invalid=True, stats=st)
    assert len(pairs) == 2 and st.skipped_invalid == 1 and message.split("'")[0].strip() in st.errors[0]


def test_invalid_json_line_and_gz(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n'))
    with pytest.raises(DataError, match=r"p.jsonl.gz:2: invalid JSON"):
        load_pairs(path)
    assert len(load_pairs(path, skip_invalid=True)) == 1


def test_prompt_longer_than_context(tmp_path):
    tok = chat_tokenizer()
    long = {"prompt": "What is 1 + 1? " * 40, "chosen": "2", "rejected": "3"}
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}, long])
    pairs = load_pairs(path)
    with pytest.raises(DataError, match=r"long.jsonl:2: prompt is \d+ tokens"):
        encode_pairs(tok, pairs, max_len=64)
    st = DataStats()
    assert len(encode_pairs(tok, pairs, max_len=64, skip_invalid=True, stats=st)) == 1
    assert st.skipped_invalid == 1


def test_encode_response_masks_everything_but_the_final_turn():
    tok = chat_tokenizer()
    prompt = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    enc = encode_response(tok, prompt, "6", "t:1")
    assert tok.decode(enc.response) == "6<|im_end|>"
    assert tok.decode(enc.prompt).endswith("<|im_start|>assistant\n")
    assert "4<|im_end|>" in tok.decode(enc.prompt)  # the earlier assistant turn is prompt, not response


def test_truncation_keeps_prompt_and_counts():
    tok = chat_tokenizer()
    pair = PreferencePair([{"role": "user", "content": "Sort: 3, 1, 2."}], "1, 2, 3 " * 30, "3, 2, 1", "t:1")
    st = DataStats()
    (enc,) = encode_pairs(tok, [pair], max_len=48, stats=st)
    assert len(enc.chosen.ids) == 48 and st.truncated == 1
    assert enc.chosen.prompt == enc.rejected.prompt


def test_pair_source_batches():
    tok = chat_tokenizer()
    enc = encode_pairs(tok, load_pairs("tasks", limit=20), max_len=128)
    src = PairSource(enc, batch_size=4, pad_id=tok.pad_id, seed=3)
    b = src.next_batch()
    assert b["input_ids"].shape[0] == 8 and b["labels"].shape == b["input_ids"].shape
    # Labels are the response tokens (shifted by one), -100 elsewhere; padding has attention 0.
    i = int(b["index"][0])
    want = enc[i].chosen.response
    got = [t for t in b["labels"][0].tolist() if t != -100]
    assert got == want
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    rej = [t for t in b["labels"][4].tolist() if t != -100]
    assert rej == enc[i].rejected.response
    # Deterministic in (seed, step), resumable.
    again = PairSource(enc, batch_size=4, pad_id=tok.pad_id, seed=3)
    again.load_state_dict({"step": 0, "seed": 3})
    assert torch.equal(again.next_batch()["input_ids"], b["input_ids"])
    src.ref_logps = torch.arange(40, dtype=torch.float32).view(20, 2)
    b2 = src.collate([5, 7])
    assert b2["ref_logps"].tolist() == [10.0, 14.0, 11.0, 15.0]


def test_unpaired_source_kl_examples_are_mismatched():
    tok = chat_tokenizer()
    enc = encode_pairs(tok, load_pairs("tasks", limit=10), max_len=128)
    src = UnpairedSource(enc, batch_size=4, pad_id=tok.pad_id)
    assert src.num_examples == 20
    for j in range(src.num_examples):
        ex, desirable = src.example(j)
        assert desirable == (j % 2 == 0)
        kl = src.kl_example(j)
        assert kl.prompt == ex.prompt
        other = enc[((j + 2) % 20) // 2] if (j + 1) % 20 // 2 == j // 2 else enc[((j + 1) % 20) // 2]
        assert kl.response in (
            other.chosen.response[: len(kl.response)],
            other.rejected.response[: len(kl.response)],
        )
    b = src.collate([0, 1, 2])
    assert b["input_ids"].shape[0] == 6 and b["desirable"].tolist() == [True, False, True]


def test_split_pairs_deterministic():
    pairs = load_pairs("tasks", limit=50)
    a, b = split_pairs(pairs, 10, seed=1)
    a2, b2 = split_pairs(pairs, 10, seed=1)
    assert [p.where for p in b] == [p.where for p in b2] and len(a) == 40 and len(b) == 10
    with pytest.raises(DataError):
        split_pairs(pairs, 0)


def test_no_warning_for_clean_sources():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pairs("tasks", limit=3)
