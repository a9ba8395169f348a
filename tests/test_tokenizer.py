"""Byte-level BPE training: exact round trips, special tokens, vocab size, save/load, HF parity, CLI."""

from __future__ import annotations

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmlab.cli import main
from llmlab.data.corpora import load_corpus
from llmlab.errors import ConfigError, DataError
from llmlab.tokenizer import (
    BOS,
    CHATML_TEMPLATE,
    DEFAULT_SPECIAL_TOKENS,
    EOS,
    IM_END,
    IM_START,
    PAD,
    Tokenizer,
)
from llmlab.tokenizer.train import tokenizer_stats, train_tokenizer


@pytest.fixture(scope="module")
def stories() -> list[str]:
    return load_corpus("tinystories")


@pytest.fixture(scope="module")
def tok(stories: list[str]) -> Tokenizer:
    return train_tokenizer(stories, vocab_size=1024)


# Any code point except surrogates (which cannot be encoded as UTF-8): controls, CJK, emoji, combining marks.
any_text = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=("Cs",))
)
TRICKY = [
    "",
    " ",
    "   \t\t\n\n  \r\n\x0b\x0c ",
    "\x00\x01\x7f\x80\x9f",
    "日本語のテキスト、中文文本，한국어",
    "👩‍👩‍👧‍👦 🇺🇸 🏳️‍🌈 e\u0301 \ufeff \u200b",
    "مرحبا بالعالم שלום",
    "Once upon a time    there was\n\n\nthe end",
    "<|eos|> <|im_start|>user\nhi<|im_end|>",
    "<|im_end", "<|eos|><|eos|>",
]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_roundtrip_arbitrary_unicode(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, split_special_tokens=True)) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_roundtrip_default_text_strategy(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_tricky(tok: Tokenizer, text: str) -> None:
    for split in (False, True):
        ids = tok.encode(text, split_special_tokens=split)
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode_batch([text, text + "x"])[1]) == text + "x"


def test_special_token_ids(tok: Tokenizer) -> None:
    for i, token in enumerate(DEFAULT_SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.stop_ids == [tok.eos_id, tok.token_to_id(IM_END)]
    # The 256 byte tokens follow the special tokens (ids 5..260), whether or not the corpus contains them.
    from tokenizers.pre_tokenizers import ByteLevel

    byte_ids = sorted(tok.token_to_id(c) for c in ByteLevel.alphabet())
    assert byte_ids == list(range(len(DEFAULT_SPECIAL_TOKENS), len(DEFAULT_SPECIAL_TOKENS) + 256))


def test_special_tokens_in_raw_text(tok: Tokenizer) -> None:
    """Default (HF-compatible): strings spelling special tokens become them; split_special_tokens spells them out."""
    im_end = tok.token_to_id(IM_END)
    assert tok.encode("<|im_end|>") == [im_end]
    assert tok.encode("hi<|eos|>")[-1] == tok.eos_id
    plain = tok.encode("hi <|im_end|> <|eos|> <|bos|>", split_special_tokens=True)
    assert not set(plain) & set(range(len(DEFAULT_SPECIAL_TOKENS)))
    assert tok.encode_batch(["<|im_end|>"], split_special_tokens=True)[0] == tok.encode(
        "<|im_end|>", split_special_tokens=True
    )
    # Plain text never yields a special id by itself.
    assert not set(tok.encode("Once upon a time, <im_end> | eos")) & set(range(len(DEFAULT_SPECIAL_TOKENS)))


@pytest.mark.parametrize("vocab_size", [261, 300, 1000, 3000])
def test_vocab_size_honoured(stories: list[str], vocab_size: int) -> None:
    tok = train_tokenizer(stories[:300], vocab_size=vocab_size)
    assert tok.vocab_size == vocab_size
    assert max(tok.encode(" ".join(stories[300:320]))) < vocab_size


def test_bad_parameters(stories: list[str]) -> None:
    with pytest.raises(ConfigError, match="vocab_size must be at least 261"):
        train_tokenizer(stories, vocab_size=260)
    with pytest.raises(ConfigError, match="min_frequency"):
        train_tokenizer(stories, vocab_size=300, min_frequency=0)
    with pytest.raises(ConfigError, match="duplicates"):
        train_tokenizer(stories, vocab_size=300, special_tokens=[BOS, BOS])
    with pytest.raises(DataError, match="empty"):
        train_tokenizer([], vocab_size=300)


def test_merges_compress_the_corpus(tok: Tokenizer, stories: list[str]) -> None:
    # Frequent words are single tokens, and the tokenizer compresses held-out stories well beyond bytes.
    for word in (" the", " upon", " happy"):
        assert len(tok.encode(word)) == 1, word
    stats = tokenizer_stats(tok, stories[-100:])
    assert stats["bytes_per_token"] > 3.0
    assert stats["tokens"] > 0


def test_save_load_roundtrip(tok: Tokenizer, tmp_path) -> None:
    tok.save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)
    text = "Once upon a time, 🐉 said <|im_end|>"
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.stop_ids) == (0, 1, 2, tok.stop_ids)
    assert loaded.chat_template == CHATML_TEMPLATE


def test_chatml_template(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = jinja2.Template(tok.chat_template).render(messages=messages, add_generation_prompt=True)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(text)
    assert ids.count(tok.token_to_id(IM_START)) == 3 and ids.count(tok.token_to_id(IM_END)) == 2
    assert tok.decode(ids) == text


def test_transformers_parity(tok: Tokenizer, tmp_path) -> None:
    """transformers' fast tokenizer reads our tokenizer.json and produces the same ids and text."""
    from transformers import PreTrainedTokenizerFast

    tok.save(tmp_path)
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token=EOS, pad_token=PAD
    )
    for text in [*TRICKY, "Once upon a time, there was a little dog named Max."]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text)
        assert hf.decode(ids) == text
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id


def test_cli_train_and_encode(tmp_path, capsys) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(load_corpus("tinystories")[:50]), encoding="utf-8")
    out = tmp_path / "tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--corpus",
                str(corpus),
                "--vocab-size",
                "400",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert Tokenizer.from_file(out).vocab_size == 400
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "a <|eos|>"]) == 0
    assert '"<|eos|>"' in capsys.readouterr().out
    assert (
        main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "10", "--out", str(out) + "-2"])
        == 2
    )
    assert "vocab_size must be at least" in capsys.readouterr().err
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--corpus",
                str(tmp_path / "nope.txt"),
                "--vocab-size",
                "400",
                "--out",
                str(out),
            ]
        )
        == 2
    )
