"""Encoder mode (``causal=False``) and the masked-LM objective (``objective=mlm``)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _infer_helpers import one_thread as one_thread_helper
from _train_helpers import byte_shards, tiny_model_config

from llmlab.errors import ConfigError, LLMLabError
from llmlab.losses.mlm import MaskedBatches, mask_tokens, mlm_loss
from llmlab.model import Transformer
from llmlab.model.kv_cache import KVCache
from llmlab.recipes.pretrain import load_pretrain_config, run_pretrain
from llmlab.tokenizer import MASK, Tokenizer
from llmlab.tokenizer.train import train_tokenizer

one_thread = pytest.fixture(scope="module", autouse=True)(one_thread_helper)


def model(causal: bool, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_model_config(causal=causal, **kw)).eval()


# ---------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_bidirectional_attention_sees_the_right_context(causal, padded):
    m = model(causal)
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 9] = (ids[:, 9] + 1) % 257  # a later token
    kw = {}
    if padded:  # the explicit-mask path: the last two positions are padding
        kw["attention_mask"] = torch.ones_like(ids)
        kw["attention_mask"][:, 10:] = 0
    with torch.no_grad():
        a, b = m(ids, **kw), m(changed, **kw)
    early = (a[:, :9] - b[:, :9]).abs().max()
    if causal:
        assert early == 0  # position < 9 never sees token 9
    else:
        assert early > 1e-4  # every position sees token 9
    if padded:  # padding is still honoured: changing a padded token changes no real position
        pad_changed = ids.clone()
        pad_changed[:, 11] = (ids[:, 11] + 1) % 257
        with torch.no_grad():
            c = m(pad_changed, **kw)
        assert (a[:, :10] - c[:, :10]).abs().max() == 0


def test_causal_default_is_unchanged_and_encoder_refuses_to_decode():
    assert tiny_model_config().causal is True
    enc = model(False)
    with pytest.raises(ConfigError, match="causal"):
        enc(torch.zeros(1, 3, dtype=torch.long), cache=KVCache(enc.cfg, 1, 8))
    from llmlab.infer.llm import LLM

    with pytest.raises(LLMLabError, match="causal"):
        LLM.from_model(enc)


# ----------------------------------------------------------------------------------------- masking
def test_masking_follows_bert_80_10_10_at_the_rate():
    vocab, mask_id = 1000, 1000
    ids = torch.randint(0, vocab, (64, 4096), generator=torch.Generator().manual_seed(0))
    for rate in (0.15, 0.3):
        corrupted, labels = mask_tokens(ids, mask_id, vocab, rate, torch.Generator().manual_seed(1))
        selected = labels != -100
        n = int(selected.sum())
        assert n / ids.numel() == pytest.approx(rate, abs=0.003)
        assert torch.equal(labels[selected], ids[selected])  # labels are the originals
        assert torch.equal(corrupted[~selected], ids[~selected])  # unselected tokens untouched
        as_mask = (corrupted[selected] == mask_id).float().mean()
        kept = (corrupted[selected] == ids[selected]).float().mean()
        random = 1 - as_mask - kept
        assert as_mask == pytest.approx(0.8, abs=0.01)
        assert kept == pytest.approx(0.1 + 0.1 / vocab, abs=0.01)  # a random draw may hit the original
        assert random == pytest.approx(0.1, abs=0.01)
        assert int(corrupted.max()) <= mask_id and (corrupted[corrupted != mask_id] < vocab).all()
    with pytest.raises(ConfigError, match="mlm_probability"):
        mask_tokens(ids, mask_id, vocab, 1.5)


def test_masked_batches_are_deterministic_and_resume(tmp_path):
    from llmlab.data.loader import PackedLoader

    data = byte_shards(tmp_path / "bytes", 20_000)
    a = MaskedBatches(PackedLoader(data, "train", 4, 32, seed=3), 257, 257, 0.15, seed=3)
    first, second = a.next_batch(), a.next_batch()
    b = MaskedBatches(PackedLoader(data, "train", 4, 32, seed=3), 257, 257, 0.15, seed=3)
    b.next_batch()
    state = b.state_dict()
    c = MaskedBatches(PackedLoader(data, "train", 4, 32, seed=3), 257, 257, 0.15, seed=3)
    c.load_state_dict(state)
    again = c.next_batch()
    for key in ("input_ids", "labels"):
        assert torch.equal(second[key], again[key])
    assert not torch.equal(first["labels"], second["labels"])
    # unshifted: the label at a masked position is the token that was there
    raw = PackedLoader(data, "train", 4, 32, seed=3).next_batch()["input_ids"]
    sel = first["labels"] != -100
    assert torch.equal(first["labels"][sel], raw[sel])


def test_mlm_loss_counts_only_masked_positions():
    m = model(False)
    ids = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(2))
    corrupted, labels = mask_tokens(ids, 256, 256, 0.25, torch.Generator().manual_seed(3))
    out = mlm_loss(m, {"input_ids": corrupted, "labels": labels})
    with torch.no_grad():
        logits = m(corrupted)
    sel = labels != -100
    expected = F.cross_entropy(logits[sel], ids[sel], reduction="sum")
    assert out.weight == int(sel.sum())
    torch.testing.assert_close(out.loss_sum.detach(), expected, rtol=1e-5, atol=1e-4)
    acc = (logits[sel].argmax(-1) == ids[sel]).float().mean()
    assert float(out.metrics["masked_acc"]) == pytest.approx(float(acc))
    # the unselected positions' predictions do not enter: the loss is not the all-position one
    everywhere = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="sum")
    assert float(everywhere) > 2 * float(expected)


def test_tokenizer_appends_the_mask_token_and_keeps_other_ids(tmp_path):
    tok = train_tokenizer(["the cat sat on the mat. " * 20, "a dog ran far away. " * 20], 300)
    before = tok.encode("the cat ran")
    size = tok.vocab_size
    assert tok.add_mask_token() == size and tok.mask_id == size
    assert tok.encode("the cat ran") == before
    assert size in tok.encode(f"the {MASK} ran")
    tok.save(tmp_path / "tok")
    again = Tokenizer.from_file(tmp_path / "tok")
    assert again.mask_id == size and again.add_mask_token() == size  # idempotent


# -------------------------------------------------------------------------------------- the recipe
def _overrides(data_dir, **extra) -> list[str]:
    base = {
        "data.dir": data_dir,
        "model.vocab_size": 257,
        "model.d_model": 64,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.max_seq_len": 64,
        "seq_len": 64,
        "batch_size": 8,
        "precision": "fp32",
        "progress": "false",
        "tensorboard": "false",
        "plot": "false",
        "eval_batches": 4,
        "eval_every": 0,
        "log_every": 5,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 5,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_tiny_mlm_pretrain_lowers_its_masked_loss(tmp_path):
    data = byte_shards(tmp_path / "bytes", 40_000)
    cfg = load_pretrain_config("tiny", overrides=_overrides(data, objective="mlm", max_steps=0))
    untrained = run_pretrain(cfg, tmp_path / "zero")
    cfg = load_pretrain_config("tiny", overrides=_overrides(data, objective="mlm", max_steps=60))
    trained = run_pretrain(cfg, tmp_path / "run")
    assert cfg.model.causal is False and cfg.model.vocab_size == 258  # bytes + [MASK]
    assert untrained["val_loss"] > 5.0  # ~ln(258) before training
    assert trained["val_loss"] < untrained["val_loss"] - 1.5
    # untrained, tied embeddings already "copy" the ~10% of selected tokens left unchanged
    assert untrained["val_masked_acc"] < 0.12 and trained["val_masked_acc"] > 0.15
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert "'causal': False" in str(saved) or '"causal": false' in json.dumps(saved)


def test_bad_objective_config_names_the_key(tmp_path, capsys):
    from llmlab.cli import main

    assert main(["pretrain", "--out", str(tmp_path / "x"), "objective=bert"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'objective'" in err[0]
    with pytest.raises(ConfigError, match="'objective'"):
        load_pretrain_config("tiny", overrides=["objective=bert"])
    with pytest.raises(ConfigError, match="'mlm_probability'"):
        load_pretrain_config("tiny", overrides=["objective=mlm", "mlm_probability=0"])
    with pytest.raises(ConfigError, match="'model.causal'"):
        load_pretrain_config("tiny", overrides=["model.causal=false"])
