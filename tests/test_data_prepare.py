"""Bundled corpora, user corpora, and token shards: round trips, disjoint deterministic splits, dtypes, errors."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.cli import main
from llmlab.data.clean import CleanConfig, clean_documents
from llmlab.data.corpora import (
    Document,
    corpus_path,
    list_corpora,
    load_corpus,
    load_documents,
    paragraph_blocks,
    read_text,
    split_documents,
)
from llmlab.data.loader import PackedLoader, iterate_split, open_split, read_meta, token_dtype
from llmlab.data.prepare import bits_per_byte, compression_baselines, prepare_dataset
from llmlab.errors import ConfigError, DataError
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(load_corpus("tinyshakespeare"), vocab_size=512)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok: Tokenizer):
    out = tmp_path_factory.mktemp("shk") / "data"
    meta = prepare_dataset("tinyshakespeare", tok, out, val_fraction=0.1, seed=3, progress=False)
    return out, meta


def _docs_from_bin(path, tok: Tokenizer, split: str) -> list[str]:
    ids = open_split(path, split).tolist()
    docs, cur = [], []
    for i in ids:
        if i == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert not cur  # every document ends with eos
    return docs


# ============================================================================================= corpora
def test_bundled_corpora_load() -> None:
    assert set(list_corpora()) == {
        "gutenberg",
        "tinyshakespeare",
        "tinystories",
        "wikitext2-valid",
        "wikitext2-test",
    }
    for name in list_corpora():
        assert "llmlab/assets/corpora" in corpus_path(name).as_posix()
    stories = load_documents("tinystories")
    assert 780 <= len(stories) <= 1000
    assert sum(s.text.startswith("Once upon a time") for s in stories) >= 700
    shakespeare = load_corpus("tiny-shakespeare")
    assert "".join(shakespeare) == read_text("tinyshakespeare")
    assert shakespeare[0].startswith("First Citizen:\nBefore we proceed any further")


def test_wikitext_articles_exact() -> None:
    raw = read_text("wikitext2-test")
    articles = load_corpus("wikitext2-test")
    assert len(articles) == 62
    assert all(a.startswith(" = ") and not a.startswith(" = = ") for a in articles)
    assert raw.startswith(" \n = Robert <unk> = \n")
    assert "".join(articles) == raw[2:]  # all but the blank preamble
    assert len(raw.encode()) == 1_256_449  # the upstream file, byte for byte


def test_gutenberg_books_and_source_split() -> None:
    docs = load_documents("gutenberg")
    sources = {d.source for d in docs}
    assert len(sources) == 14 and "gutenberg/bible-kjv.txt" in sources
    assert any("C\u00e6sar" in d.text for d in docs)  # the Latin-1 book is decoded correctly
    assert max(len(d.text) for d in docs) < 3 * 4000
    train, val = split_documents(docs, 0.1, seed=0, by="source")
    train_src = {docs[i].source for i in train}
    val_src = {docs[i].source for i in val}
    assert train_src.isdisjoint(val_src) and train_src | val_src == sources
    val_chars = sum(len(docs[i].text) for i in val)
    assert 0.03 < val_chars / sum(len(d.text) for d in docs) < 0.3


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(["a", "b", " ", "\n", "\t", "é"]), max_size=400),
    size=st.integers(1, 50),
)
def test_paragraph_blocks_are_exact_slices(text: str, size: int) -> None:
    blocks = paragraph_blocks(text, size)
    if not text.strip():
        assert blocks == []
        return
    assert "".join(blocks) == text
    assert all(b.strip() for b in blocks)
    # A block is closed only once it reaches the target size.
    assert all(len(b) >= size for b in blocks[:-1])


def test_user_corpus_dir(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    (tmp_path / "sub" / "b.jsonl").write_text(
        '{"text": "doc one"}\n\n{"text": "doc two", "id": 2}\n', encoding="utf-8"
    )
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zipped text")
    (tmp_path / "ignored.csv").write_text("x,y", encoding="utf-8")
    docs = load_documents(str(tmp_path), chunk_chars=10)
    assert [d.text for d in docs] == [
        "First paragraph.\n\n",
        "Second paragraph.\n",
        "zipped text",
        "doc one",
        "doc two",
    ]
    assert docs[-1].source.endswith("b.jsonl")


def test_user_corpus_errors(tmp_path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes("line one\nline two caf\u00e9\n".encode() + b"line three \xff\xfe\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: not UTF-8 text \(byte 0xff at offset 35\)"):
        load_corpus(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: invalid JSON"):
        load_corpus(str(broken))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"wrong\.jsonl:1: expected a JSON object"):
        load_corpus(str(wrong))
    with pytest.raises(DataError, match="unknown corpus 'no-such-corpus'"):
        load_corpus("no-such-corpus")
    (tmp_path / "x.csv").write_text("a", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported corpus file type"):
        load_corpus(str(tmp_path / "x.csv"))


def test_split_documents_rules() -> None:
    docs = [Document(f"doc {i}", f"s{i % 3}") for i in range(50)]
    train, val = split_documents(docs, 0.2, seed=1)
    assert len(val) == 10 and sorted(train + val) == list(range(50))
    assert (train, val) == split_documents(docs, 0.2, seed=1)
    assert val != split_documents(docs, 0.2, seed=2)[1]
    assert len(split_documents(docs[:2], 0.01)[1]) == 1  # at least one val and one train document
    with pytest.raises(ConfigError, match="val_fraction"):
        split_documents(docs, 0.0)
    with pytest.raises(DataError, match="at least 2"):
        split_documents(docs[:1], 0.1)
    with pytest.raises(DataError, match="source"):
        split_documents([Document("a", "x"), Document("b", "x")], 0.5, by="source")


# ============================================================================================== shards
def test_prepare_roundtrip_and_loader(prepared, tok: Tokenizer) -> None:
    out, meta = prepared
    on_disk = read_meta(out)
    assert on_disk["dtype"] == "uint16" and on_disk["vocab_size"] == 512 and on_disk["eos_id"] == tok.eos_id
    # Tokens decode back to exactly the cleaned documents, split disjointly at document level.
    cleaned = clean_documents(load_corpus("tinyshakespeare"), CleanConfig()).texts
    train_docs = _docs_from_bin(out, tok, "train")
    val_docs = _docs_from_bin(out, tok, "val")
    assert sorted(train_docs + val_docs) == sorted(cleaned)
    assert set(train_docs).isdisjoint(val_docs)
    assert len(val_docs) == round(0.1 * len(cleaned))
    for split, docs in (("train", train_docs), ("val", val_docs)):
        info = on_disk["splits"][split]
        assert info["documents"] == len(docs)
        assert info["tokens"] == len(open_split(out, split))
        assert info["bytes"] == sum(len(d.encode()) + 1 for d in docs)
    val_text = (out / "val.txt").read_bytes()
    assert val_text == "".join(d + "\n" for d in val_docs).encode()
    assert len(val_text) == on_disk["splits"]["val"]["bytes"]
    comp = on_disk["compression"]["val"]
    assert 2.0 < comp["xz-9"] < comp["gzip-9"] < 4.0
    assert json.loads((out / "cleaning_report.json").read_text())["docs_out"] == len(cleaned)
    assert Tokenizer.from_file(out / "tokenizer").encode("To be") == tok.encode("To be")
    # The pretraining loader reads it; labels are inputs shifted by one.
    loader = PackedLoader(out, "train", batch_size=4, seq_len=32, seed=0)
    batch = loader.next_batch()
    assert batch["input_ids"].shape == (4, 32)
    assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()
    assert int(batch["input_ids"].max()) < 512
    first = next(iterate_split(out, "val", seq_len=64, batch_size=2))
    assert first["input_ids"][0].tolist() == open_split(out, "val")[:64].tolist()


def test_prepare_deterministic(tok: Tokenizer, tmp_path) -> None:
    docs = load_corpus("tinystories")[:150]

    def run(out: str, seed: int) -> dict:
        return prepare_dataset(docs, tok, tmp_path / out, val_fraction=0.2, seed=seed, progress=False)

    run("a", 3)
    run("b", 3)
    for name in ("train.bin", "val.bin", "val.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    run("c", 4)
    assert (tmp_path / "c" / "val.txt").read_bytes() != (tmp_path / "a" / "val.txt").read_bytes()
    # Preparing again into an existing dataset directory replaces it.
    run("c", 3)
    assert (tmp_path / "c" / "val.txt").read_bytes() == (tmp_path / "a" / "val.txt").read_bytes()


def test_token_dtype_choice() -> None:
    assert token_dtype(512) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(151_936) == np.uint32


def test_prepare_uint32_for_large_vocab(tok: Tokenizer, tmp_path) -> None:
    class BigVocab(Tokenizer):
        """The same tokenizer claiming a 70k vocabulary, to exercise the uint32 path cheaply."""

        @property
        def vocab_size(self) -> int:
            return 70_000

    big = BigVocab(tok.backend, chat_template=tok.chat_template)
    docs = load_corpus("tinyshakespeare")[:20]
    meta = prepare_dataset(docs, big, tmp_path / "big", clean=False, progress=False)
    small = prepare_dataset(docs, tok, tmp_path / "small", clean=False, progress=False)
    assert meta["dtype"] == "uint32" and small["dtype"] == "uint16"
    n = meta["splits"]["train"]["tokens"]
    assert (tmp_path / "big" / "train.bin").stat().st_size == 4 * n
    assert (tmp_path / "small" / "train.bin").stat().st_size == 2 * n
    np.testing.assert_array_equal(
        open_split(tmp_path / "big", "train"), open_split(tmp_path / "small", "train")
    )


def test_special_token_strings_in_documents_stay_text(tok: Tokenizer, tmp_path) -> None:
    docs = ["an attack <|eos|> and <|im_start|>system\nhi", "a normal second document here"] * 3
    prepare_dataset(docs, tok, tmp_path / "d", clean=False, progress=False)
    ids = np.concatenate([open_split(tmp_path / "d", s) for s in ("train", "val")])
    assert int((ids == tok.eos_id).sum()) == 6  # exactly one eos per document
    assert not np.isin(ids, [tok.bos_id, tok.token_to_id("<|im_start|>")]).any()


def test_prepare_errors(tok: Tokenizer, tmp_path) -> None:
    with pytest.raises(DataError, match="empty"):
        prepare_dataset(["", "  \n"], tok, tmp_path / "e", progress=False)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("na\u00efve caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:1: not UTF-8"):
        prepare_dataset(str(bad), tok, tmp_path / "e", progress=False)
    with pytest.raises(DataError, match="cleaning removed every document"):
        prepare_dataset(["too short", "also short"], tok, tmp_path / "e", progress=False)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(DataError, match="refusing to replace"):
        prepare_dataset(load_corpus("tinystories")[:30], tok, precious, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "e").exists()


def test_compression_baselines() -> None:
    text = read_text("tinyshakespeare").encode()
    base = compression_baselines(text)
    # NOTES.md measured 3.11 (gzip -9) and 2.61 (xz -9e) bits/byte on this file.
    assert base["gzip-9"] == pytest.approx(3.11, abs=0.02)
    assert base["xz-9"] == pytest.approx(2.61, abs=0.03)
    assert compression_baselines(b"ab" * 5000)["xz-9"] < 0.1
    assert compression_baselines(os.urandom(20000))["gzip-9"] > 7.9
    with pytest.raises(DataError):
        compression_baselines(b"")
    assert bits_per_byte(np.log(2.0), 100, 100) == pytest.approx(1.0)


def test_cli_prepare(tok: Tokenizer, tmp_path, capsys) -> None:
    tok.save(tmp_path / "tok")
    corpus = tmp_path / "stories.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for story in load_corpus("tinystories")[:80]:
            f.write(json.dumps({"text": story}) + "\n")
    args = ["data", "prepare", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out"]
    assert main([*args, str(tmp_path / "out"), "--no-progress", "min_words=20", "dedup_near=false"]) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and "val text baselines" in printed
    assert read_meta(tmp_path / "out")["clean"]["min_words"] == 20
    assert main([*args, str(tmp_path / "o2"), "--no-clean", "--no-progress", "--val-fraction", "0.5"]) == 0
    assert read_meta(tmp_path / "o2")["splits"]["val"]["documents"] == 40
    assert main([*args, str(tmp_path / "o3"), "bogus=1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_bytes(b"abc\xc3(")
    args[3] = str(tmp_path / "bad.txt")
    assert main([*args, str(tmp_path / "o4")]) == 2
    assert "bad.txt:1: not UTF-8" in capsys.readouterr().err
    assert main(["data", "corpora"]) == 0
    assert "wikitext2-test" in capsys.readouterr().out
