"""DPO-family runner: the reference cache, LoRA's adapter-disabled reference, and each loss training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _align_helpers import chat_tokenizer, tiny_model

from llmlab.align.data import DataStats
from llmlab.model.lora import LoRAConfig, apply_lora
from llmlab.recipes import dpo as offline
from llmlab.recipes.dpo import AlignConfig, build_sources, cached_reference, make_offline_loss, run_offline
from llmlab.train import TrainConfig


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cfg(loss: str = "dpo", steps: int = 20, **kw) -> AlignConfig:
    train = TrainConfig(
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=2,
        max_steps=steps,
        batch_size=8,
        weight_decay=0.0,
        eval_every=0,
        log_every=5,
        progress=False,
        tensorboard=False,
        plot=False,
        precision="fp32",
        spike_factor=0.0,
        peak_tflops=1.0,  # skip the one-off peak-FLOPs measurement (only for the MFU log)
    )
    base = dict(
        data=["tasks"], max_pairs=240, n_heldout=40, max_len=96, loss=loss, train=train, eval_batch_size=32
    )
    base.update(kw)
    return AlignConfig(**base)


def test_reference_cache_equals_policy_at_start(tmp_path, monkeypatch):
    tok = chat_tokenizer()
    model = tiny_model(seed=2)
    cfg = small_cfg()
    train_src, _ = build_sources(cfg, tok, DataStats())
    train_src.ref_logps = cached_reference(model, train_src, tmp_path, "t", 32, use_lora=False)
    assert (tmp_path / offline.REF_CACHE_FILE).is_file()
    # Before any update the policy IS the reference: every DPO loss is exactly log 2, rewards 0.
    out = make_offline_loss(cfg)(model, train_src.next_batch())
    assert out.loss_sum.item() / out.weight == pytest.approx(math.log(2), abs=1e-5)
    assert out.metrics["reward_margin"] == pytest.approx(0.0, abs=1e-5)

    # Computed once: a second run with the same data reads the file instead of running the model.
    def boom(*a, **k):
        raise AssertionError("reference recomputed")

    monkeypatch.setattr(offline, "compute_reference_logps", boom)
    again = cached_reference(model, train_src, tmp_path, "t", 32, use_lora=False)
    assert torch.equal(again, train_src.ref_logps)


def test_lora_reference_is_the_base_with_adapter_disabled():
    tok = chat_tokenizer()
    base = tiny_model(seed=3)
    frozen_copy = copy.deepcopy(base)  # only to check the answer; the runner never makes one
    apply_lora(base, LoRAConfig(r=4, alpha=8.0))
    for name, p in base.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter
    cfg = small_cfg(max_pairs=60, n_heldout=10)
    src, _ = build_sources(cfg, tok, DataStats())
    ref = cached_reference(base, src, None, "t", 32, use_lora=True)
    want = offline.compute_reference_logps(frozen_copy, src, 32)
    assert torch.allclose(ref, want, atol=1e-4)
    with_adapter = offline.compute_reference_logps(base, src, 32)
    assert not torch.allclose(with_adapter, want, atol=1e-2)


def test_policy_trains_without_dropout_and_keeps_lora_dropout():
    """A base pretrained with dropout (like the demo's) must not train with it: at step 0 the policy's
    log-probs in train mode would differ from the dropout-free reference cache."""
    model = tiny_model(seed=4, dropout=0.3)
    ids = torch.randint(0, 100, (2, 16))
    model.train()
    assert not torch.equal(model(ids), model(ids))  # dropout is live before
    offline.prepare_policy(model, True, LoRAConfig(r=4, alpha=8.0, dropout=0.2), frozen_reference=False)
    model.train()
    lora_dropouts = [m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora" in n]
    assert lora_dropouts and all(p == 0.2 for p in lora_dropouts)
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout) and "lora" in n:
            m.p = 0.0  # LoRA's own dropout is random by design; the rest must already be off
    assert torch.equal(model(ids), model(ids))
    assert model.cfg.dropout == 0.0


@pytest.mark.parametrize("loss", ["dpo", "dpop", "ipo", "kto", "orpo", "simpo"])
def test_each_loss_improves_held_out_preferences(tmp_path, loss):
    tok = chat_tokenizer()
    model = tiny_model(seed=4)
    # ORPO's default beta (0.1) lets the NLL term dominate a from-scratch model for 20 steps; weight the
    # odds-ratio term up so the preference signal shows within the test budget.
    # The reference-free losses (ORPO, SimPO) start with no reference to rank against, so they get 60 steps.
    steps = 60 if loss in offline.REFERENCE_FREE else 20
    cfg = small_cfg(loss, steps=steps, beta=1.0 if loss == "orpo" else None)
    m = run_offline(cfg, tmp_path / loss, model=model, tokenizer=tok)
    assert m["pairs_train"] == 200 and m["pairs_heldout"] == 40
    assert math.isfinite(m["loss"])
    if loss == "kto":
        assert m["val_rewards_desirable"] > m["val_rewards_undesirable"]
    else:
        # Held-out implicit reward ranks chosen above rejected for most pairs after training.
        assert m["val_reward_accuracy"] >= 0.6, m
    assert (tmp_path / loss / "final" / "model.safetensors").is_file()


def test_lora_dpo_saves_adapter(tmp_path):
    tok = chat_tokenizer()
    cfg = small_cfg(
        "dpo", steps=6, use_lora=True, lora=LoRAConfig(r=4, alpha=8.0), max_pairs=80, n_heldout=16
    )
    cfg.train.lr = 5e-3
    m = run_offline(cfg, tmp_path / "lora", model=tiny_model(seed=5), tokenizer=tok)
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    assert m["val_reward_margin"] != 0.0


def test_bad_config_is_refused():
    from llmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="'loss'"):
        small_cfg("xpo").validate()
    with pytest.raises(ConfigError, match="beta"):
        small_cfg(beta=-1.0).validate()


def test_rpo_adds_the_chosen_nll():
    tok = chat_tokenizer()
    model = tiny_model(seed=6)
    cfg = small_cfg(max_pairs=40, n_heldout=8, rpo_alpha=0.5)
    src, _ = build_sources(cfg, tok, DataStats())
    src.ref_logps = cached_reference(model, src, None, "t", 32, use_lora=False)
    batch = src.next_batch()
    out = make_offline_loss(cfg)(model, batch)
    sums, counts = offline.sequence_logps(model, batch)
    B = sums.shape[0] // 2
    nll = (-sums[:B] / counts[:B]).mean().item()
    assert out.loss_sum.item() / out.weight == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-5)


def test_onpolicy_pairs_are_judged_by_the_verifier():
    """``onpolicy:tasks`` samples the policy: every chosen passes the verifier, every rejected fails it."""
    from llmlab.align.rollout import OnPolicyConfig, load_problems, score_completion, verifier_pairs

    tok = chat_tokenizer()
    model = tiny_model(seed=3)
    source = "tasks:addition,json"
    records, info = verifier_pairs(model, tok, source, 12, samples=2)
    # An untrained model is never right, so every prompt yields a pair (reference answer vs its own sample).
    assert info["onpolicy_prompts"] == 12 and len(records) >= 10
    problems = {p.prompt[0]["content"]: p for p in load_problems(source, "train", 12)}
    for r in records:
        problem = problems[r["prompt"][0]["content"]]
        assert score_completion(problem, r["chosen"]) == (True, True)
        assert score_completion(problem, r["rejected"]) != (True, True)

    cfg = small_cfg(
        data=[f"onpolicy:{source}"], max_pairs=12, onpolicy=OnPolicyConfig(samples=2), n_heldout=2
    )
    stats = DataStats()
    train_src, held_src = build_sources(cfg, tok, stats, model)
    assert len(train_src.pairs) + len(held_src.pairs) == stats.extra["onpolicy_pairs"] == len(records)
    with pytest.raises(Exception, match="needs the model"):
        build_sources(cfg, tok, DataStats())


def test_rounds_resample_pairs_and_move_the_reference(tmp_path):
    """Iterative on-policy DPO: round 2 samples its pairs from the round-1 policy and uses that policy as the
    reference (not the starting model)."""
    import dataclasses

    from safetensors.torch import load_file

    import llmlab
    from llmlab.align.rollout import OnPolicyConfig
    from llmlab.errors import ConfigError

    tok = chat_tokenizer()
    start = tiny_model(seed=5)
    policy = copy.deepcopy(start)
    cfg = small_cfg(
        steps=4,
        data=["onpolicy:tasks:addition,json"],
        max_pairs=16,
        n_heldout=4,
        onpolicy=OnPolicyConfig(samples=2),
        rounds=2,
    )
    m = run_offline(cfg, tmp_path, model=policy, tokenizer=tok)
    assert [r["round"] for r in m["rounds_summary"]] == [1, 2]
    assert (tmp_path / "round-1" / "final").is_dir() and (tmp_path / "final").is_dir()

    after_round_1, _ = llmlab.load(tmp_path / "round-1" / "final")
    round2 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + 1))
    src, _ = build_sources(round2, tok, DataStats(), after_round_1)
    cached = [
        v for v in load_file(str(tmp_path / offline.REF_CACHE_FILE)).values() if len(v) == len(src.pairs)
    ]
    assert len(cached) == 1
    assert torch.allclose(cached[0], offline.compute_reference_logps(after_round_1, src, 32), atol=1e-4)
    assert not torch.allclose(cached[0], offline.compute_reference_logps(start, src, 32), atol=1e-3)

    with pytest.raises(ConfigError, match="rounds"):
        small_cfg(rounds=2).validate()  # data=tasks has nothing to resample
