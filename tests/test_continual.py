"""Continual pre-training: ``llmlab pretrain --init-from MODEL`` and replay of the old domain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _infer_helpers import one_thread as one_thread_helper

from llmlab.cli import main
from llmlab.data.corpora import load_documents
from llmlab.data.loader import PackedLoader
from llmlab.data.mixture import ReplayLoader, is_replay_row
from llmlab.data.prepare import prepare_dataset
from llmlab.losses.lm import causal_lm_loss
from llmlab.model.checkpoint import load_checkpoint
from llmlab.tokenizer.train import train_tokenizer
from llmlab.train.logging import read_metrics

SEQ = 32
QUIET = [
    "seq_len=32",
    "batch_size=4",
    "precision=fp32",
    "progress=false",
    "tensorboard=false",
    "plot=false",
    "eval_batches=2",
    "eval_every=0",
    "log_every=1",
    "peak_tflops=1.0",
]


one_thread = pytest.fixture(scope="module", autouse=True)(one_thread_helper)


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict[str, Path]:
    """A 320-token tokenizer, an old domain (TinyStories), a new one (Shakespeare), a model trained on the old."""
    root = tmp_path_factory.mktemp("continual")
    stories = [d.text for d in load_documents("tinystories")[:60]]
    plays = [d.text for d in load_documents("tinyshakespeare")[:25]]
    tok = train_tokenizer(stories + plays, 320)
    old = root / "old"
    new = root / "new"
    prepare_dataset(stories, tok, old, clean=False, progress=False)
    prepare_dataset(plays, tok, new, clean=False, progress=False)
    base = root / "base"
    model_keys = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1"]
    args = [f"data.dir={old}", "model.max_seq_len=32", "max_steps=12", "lr=3e-3", "warmup_steps=2"]
    assert main(["pretrain", "--out", str(base), *args, *model_keys, *QUIET]) == 0
    return {"root": root, "old": old, "new": new, "base": base}


def _train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "train"}


def test_init_from_starts_from_the_given_weights(domains, tmp_path):
    """The first step's loss is the loaded model's loss on that batch: training continues from its weights."""
    out = tmp_path / "cont"
    args = [f"data.dir={domains['new']}", "max_steps=1", "warmup_steps=0", "lr=1e-4", "min_lr=1e-5"]
    assert main(["pretrain", "--init-from", str(domains["base"]), "--out", str(out), *args, *QUIET]) == 0
    first = _train_losses(out)[1]

    base, base_tok = load_checkpoint(domains["base"] / "final")
    batch = PackedLoader(domains["new"], "train", 4, SEQ, seed=0).next_batch()
    with torch.no_grad():
        expected = causal_lm_loss(base, batch)
    assert first == pytest.approx(float(expected.loss_sum) / expected.weight, abs=1e-5)
    torch.manual_seed(123)  # a fresh model of the same shape scores the batch very differently
    fresh = type(base)(base.cfg)
    with torch.no_grad():
        fresh_out = causal_lm_loss(fresh, batch)
    assert abs(float(fresh_out.loss_sum) / fresh_out.weight - first) > 0.1
    # The run records where it started, keeps the model's shape and tokenizer.
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["pretrain"]["init_from"] == str(domains["base"])
    model, tok = load_checkpoint(out / "final")
    assert model.cfg.d_model == 32 and tok.backend.get_vocab() == base_tok.backend.get_vocab()


def test_vocab_mismatch_names_model_and_data(domains, tmp_path, capsys):
    other_tok = train_tokenizer(["completely different text " * 50, "zebra quartz " * 40], 280)
    other = tmp_path / "other"
    prepare_dataset(
        [d.text for d in load_documents("tinyshakespeare")[:5]], other_tok, other, clean=False, progress=False
    )
    out = tmp_path / "bad"
    code = main(
        ["pretrain", "--init-from", str(domains["base"]), "--out", str(out), f"data.dir={other}", *QUIET]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(domains["base"]) in err[0] and str(other) in err[0]
    assert "tokenizer" in err[0]
    assert not (out / "final").exists()


def test_init_from_refuses_a_shape_changing_override(domains, tmp_path, capsys):
    code = main(
        ["pretrain", "--init-from", str(domains["base"]), "--out", str(tmp_path / "x"),
         f"data.dir={domains['new']}", "model.d_model=64", *QUIET]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "embed_tokens.weight" in err and "(320, 32)" in err and "(320, 64)" in err


def _shards(directory: Path, low: int, high: int, n: int = 2000) -> Path:
    directory.mkdir(parents=True)
    ids = np.random.default_rng(low).integers(low, high, size=n).astype(np.uint16)
    for split in ("train", "val"):
        ids.tofile(directory / f"{split}.bin")
    meta = {"dtype": "uint16", "vocab_size": 300, "splits": {}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def test_replay_fraction_is_realized_exactly_and_world_size_independent(tmp_path):
    main_dir, old_dir = _shards(tmp_path / "main", 0, 100), _shards(tmp_path / "old", 200, 300)
    loader = ReplayLoader(main_dir, old_dir, 0.3, "train", batch_size=4, seq_len=8, seed=1)
    rows = [loader.next_batch() for _ in range(25)]
    replay = sum(int(b["replay_rows"]) for b in rows)
    assert replay == math.floor(100 * 0.3)  # exact after N rows: floor(N * f)
    for b in rows:  # a replay row is wholly old-domain text, the others wholly new-domain
        per_row = (b["input_ids"] >= 200).all(dim=1)
        assert int(per_row.sum()) == int(b["replay_rows"])
        assert ((b["input_ids"] < 100).all(dim=1) | per_row).all()
    # Two ranks of batch 2 together hold the rows of one process's batch 4, and resuming gives the same batch.
    one = ReplayLoader(main_dir, old_dir, 0.3, "train", batch_size=4, seq_len=8, seed=1, step=7)
    ranks = [
        ReplayLoader(main_dir, old_dir, 0.3, "train", 2, 8, seed=1, rank=r, world_size=2, step=7)
        for r in (0, 1)
    ]
    full = one.next_batch()["input_ids"]
    halves = [r.next_batch()["input_ids"] for r in ranks]
    assert torch.equal(full[0::2], halves[0]) and torch.equal(full[1::2], halves[1])
    assert torch.equal(full, rows[7]["input_ids"])
    assert [is_replay_row(n, 0.0) for n in range(10)] == [False] * 10


def test_continual_run_with_replay_tracks_the_old_domain(domains, tmp_path):
    out = tmp_path / "replay"
    args = [
        f"data.dir={domains['new']}",
        f"data.replay_dir={domains['old']}",
        "data.replay_fraction=0.5",
        "max_steps=2",
        "warmup_steps=1",
    ]
    assert main(["pretrain", "--init-from", str(domains["base"]), "--out", str(out), *args, *QUIET]) == 0
    val = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "val"]
    assert val and math.isfinite(val[-1]["replay_loss"]) and math.isfinite(val[-1]["loss"])


def test_replay_fraction_needs_a_replay_dir(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "x"), "data.replay_fraction=0.3", *QUIET]) == 2
    err = capsys.readouterr().err
    assert "replay_fraction" in err and "replay_dir" in err


def test_init_from_a_hugging_face_directory(domains, tmp_path):
    """Any loadable format: the same weights exported as a Hugging Face directory start the same run."""
    from llmlab.interop.hf import save_hf

    base, base_tok = load_checkpoint(domains["base"] / "final")
    hf_dir = tmp_path / "hf"
    save_hf(hf_dir, base, base_tok)
    out = tmp_path / "cont-hf"
    args = [f"data.dir={domains['new']}", "max_steps=1", "warmup_steps=0", "lr=1e-4", "min_lr=1e-5"]
    assert main(["pretrain", "--init-from", str(hf_dir), "--out", str(out), *args, *QUIET]) == 0
    batch = PackedLoader(domains["new"], "train", 4, SEQ, seed=0).next_batch()
    with torch.no_grad():
        expected = causal_lm_loss(base, batch)
    assert _train_losses(out)[1] == pytest.approx(float(expected.loss_sum) / expected.weight, abs=1e-4)
