"""Context extension: RoPE scaling trained and saved, per-position loss, and the passkey test."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from _infer_helpers import one_thread as one_thread_helper
from torch import nn

from llmlab.cli import main
from llmlab.data.corpora import load_documents
from llmlab.data.loader import iterate_split, open_split
from llmlab.data.prepare import prepare_dataset
from llmlab.eval.long_context import (
    NEEDLE,
    PREAMBLE,
    QUESTION,
    bucket_losses,
    make_passkey_sample,
    passkey_accuracy,
    per_position_loss,
)
from llmlab.model.checkpoint import load_checkpoint, save_checkpoint
from llmlab.model.config import ModelConfig
from llmlab.model.transformer import Transformer
from llmlab.tokenizer.train import train_tokenizer
from llmlab.train.evaluation import evaluate_loss

one_thread = pytest.fixture(scope="module", autouse=True)(one_thread_helper)


@pytest.fixture(scope="module")
def tok():
    texts = [d.text for d in load_documents("tinyshakespeare")[:20]]
    return train_tokenizer(texts + [NEEDLE.format(key=str(k)) for k in range(100)], 320)


def tiny(vocab: int, **kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32)
    base.update(kw)
    return Transformer(ModelConfig(**base))


# ------------------------------------------------------------------------------------------ passkey
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_sample_is_correct_by_construction(tok, depth):
    sample = make_passkey_sample(tok, 200, depth, random.Random(3))
    assert len(sample.prompt_ids) == 200
    text = tok.decode(sample.prompt_ids)
    needle = NEEDLE.format(key=sample.key)
    assert needle in text and text.count(sample.key) == 2  # only the needle holds the key
    assert text.endswith("What is the pass key? The pass key is")
    assert tok.decode(sample.answer_ids).strip() == sample.key and len(sample.key) == 5
    n_needle = len(tok.encode(needle))
    assert tok.decode(sample.prompt_ids[sample.needle_start : sample.needle_start + n_needle]) == needle
    # needle and question follow a full stop (whole filler sentences), never a sentence cut mid-way
    assert text[: text.index(needle)].rstrip().endswith(".")
    assert text[: text.index(" What is the pass key?")].rstrip().endswith(".")
    n_head = len(tok.encode(PREAMBLE))
    n_filler = 200 - n_head - n_needle - len(tok.encode(QUESTION))
    assert (sample.needle_start - n_head) / n_filler == pytest.approx(depth, abs=0.05)


class InductionModel(nn.Module):
    """A stand-in that can retrieve: predicts the token that followed the longest earlier match of the
    current suffix (an idealised induction head). Uniform logits where nothing matches."""

    def __init__(self, vocab: int, span: int = 8):
        super().__init__()
        self.vocab, self.span = vocab, span
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        for r in range(b):
            ids = input_ids[r].tolist()
            for pos in range(max(0, t - self.span), t):
                for k in range(min(6, pos), 0, -1):
                    suffix = ids[pos - k + 1 : pos + 1]
                    hit = next(
                        (s for s in range(pos - k, -1, -1) if ids[s : s + k] == suffix and s + k < pos + 1),
                        None,
                    )
                    if hit is not None:
                        logits[r, pos, ids[hit + k]] = 10.0
                        break
        return logits


def test_passkey_scorer_separates_a_retriever_from_a_random_model(tok):
    lengths, depths = [120, 240], [0.0, 0.5, 1.0]
    good = passkey_accuracy(InductionModel(tok.vocab_size), tok, lengths, depths, samples_per_cell=2)
    bad = passkey_accuracy(tiny(tok.vocab_size, max_seq_len=256), tok, lengths, depths, samples_per_cell=2)
    assert all(r["accuracy"] == 1.0 for r in good) and len(good) == 6
    assert all(r["accuracy"] == 0.0 for r in bad)


# --------------------------------------------------------------------------------- per-position loss
def test_per_position_loss_averages_to_the_eval_loss(tok, tmp_path):
    data = tmp_path / "data"
    prepare_dataset(
        [d.text for d in load_documents("tinyshakespeare")[:8]], tok, data, clean=False, progress=False
    )
    model = tiny(tok.vocab_size)
    losses = per_position_loss(model, open_split(data, "val"), 32, max_windows=6, batch_size=4)
    assert losses.shape == (32,)
    reference = evaluate_loss(model, iterate_split(data, "val", 32, 2, 3))["loss"]
    assert float(losses.mean()) == pytest.approx(reference, rel=1e-5)
    buckets = bucket_losses(losses, 4)
    assert [b["end"] for b in buckets] == [8, 16, 24, 32]
    assert np.mean([b["loss"] for b in buckets]) == pytest.approx(float(losses.mean()), rel=1e-6)


# ---------------------------------------------------------------------------- rope scaling, trained
def test_rope_scaling_is_trained_saved_and_reloaded(tok, tmp_path):
    """init-from with a longer context and linear (PI) scaling: the scaling is what trains, is saved, and
    what the reloaded model runs with."""
    base_dir, data, out = tmp_path / "base", tmp_path / "data", tmp_path / "long"
    save_checkpoint(base_dir, tiny(tok.vocab_size), tok)
    prepare_dataset(
        [d.text for d in load_documents("tinyshakespeare")[:8]], tok, data, clean=False, progress=False
    )
    scaling = [
        "model.max_seq_len=64",
        "model.rope_scaling.type=linear",
        "model.rope_scaling.factor=2",
        "model.rope_scaling.original_max_seq_len=32",
    ]
    quiet = ["precision=fp32", "progress=false", "tensorboard=false", "plot=false", "peak_tflops=1"]
    args = [f"data.dir={data}", "seq_len=64", "batch_size=2", "max_steps=2", "eval_batches=1", *quiet]
    assert main(["pretrain", "--init-from", str(base_dir), "--out", str(out), *args, *scaling]) == 0
    model, _ = load_checkpoint(out / "final")
    rs = model.cfg.rope_scaling
    assert (rs.type, rs.factor, rs.original_max_seq_len, model.cfg.max_seq_len) == ("linear", 2.0, 32, 64)
    plain = tiny(tok.vocab_size, max_seq_len=64)
    assert torch.allclose(model.rotary.inv_freq, plain.rotary.inv_freq / 2)
    # The reloaded weights under PI differ in output from the same weights without it.
    unscaled_cfg = copy.deepcopy(model.cfg)
    unscaled_cfg.rope_scaling.type = "none"
    unscaled = Transformer(unscaled_cfg)
    unscaled.load_state_dict(model.state_dict())
    ids = torch.tensor([tok.encode("To be, or not to be, that is the question")])
    with torch.no_grad():
        assert not torch.allclose(model(ids), unscaled(ids), atol=1e-4)
