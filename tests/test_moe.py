"""Mixture of experts (``ffn="moe"``): routing, grouped compute against a per-token reference, capacity
dropping, the router losses and their hook in the LM loss, the KV cache and the engine, QK-norm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.errors import ConfigError
from llmlab.losses.lm import causal_lm_loss
from llmlab.losses.moe import expert_load, load_balancing_loss, router_losses, router_z_loss
from llmlab.model import KVCache, ModelConfig, Transformer
from llmlab.model.moe import MoE, route
from llmlab.model.transformer import flops_per_token

VOCAB = 97


def _cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        ffn="moe",
        n_experts=4,
        experts_top_k=2,
        moe_d_ff=24,
    )
    base.update(kw)
    return ModelConfig(**base)


def _reference_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's function written per token (the test's slow oracle, never the implementation)."""
    flat = x.reshape(-1, x.shape[-1])
    ex = layer.experts
    rows = []
    for t in range(flat.shape[0]):
        xt = flat[t]
        w, idx = route(layer.gate(xt)[None], layer.top_k, layer.router_mode, layer.norm_topk_prob)
        y = torch.zeros_like(xt)
        for j, e in enumerate(idx[0].tolist()):
            h = F.silu(ex.gate_proj[e] @ xt) * (ex.up_proj[e] @ xt)
            y = y + w[0, j] * (ex.down_proj[e] @ h)
        if layer.shared_expert is not None:
            y = y + torch.sigmoid(layer.shared_expert_gate(xt)) * layer.shared_expert(xt)
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


def test_router_modes():
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    w_norm, i_norm = route(logits, 2, "softmax_topk", norm_topk_prob=True)
    w_raw, i_raw = route(logits, 2, "softmax_topk", norm_topk_prob=False)
    w_ts, i_ts = route(logits, 2, "topk_softmax")
    assert torch.equal(i_norm, i_ts) and torch.equal(i_norm, i_raw)
    torch.testing.assert_close(w_ts, w_norm)  # top-k-then-softmax == softmax-then-top-k renormalized
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(w_raw, probs.gather(1, i_raw))
    assert (w_raw.sum(-1) < 1).all() and torch.allclose(w_norm.sum(-1), torch.ones(50))


@pytest.mark.parametrize("shared,mode,norm", [(0, "softmax_topk", True), (20, "softmax_topk", False)])
def test_grouped_moe_matches_per_token_reference(shared, mode, norm):
    torch.manual_seed(0)
    cfg = _cfg(shared_expert_d_ff=shared, moe_router=mode, norm_topk_prob=norm, n_experts=5, experts_top_k=3)
    layer = Transformer(cfg).layers[0].mlp
    x = torch.randn(3, 7, cfg.d_model, requires_grad=True)
    out = layer(x)
    ref = _reference_moe(layer, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Gradients of the grouped path equal those of the per-token oracle (experts, router, input).
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, layer.experts.down_proj, layer.gate.weight], g)
    ref_grads = torch.autograd.grad(ref, [x, layer.experts.down_proj, layer.gate.weight], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_capacity_drops_overflow_in_training_only():
    torch.manual_seed(0)
    cfg = _cfg(n_experts=4, experts_top_k=1, capacity_factor=1.0)
    layer = Transformer(cfg).layers[0].mlp
    with torch.no_grad():  # every token's first choice is expert 0
        layer.gate.weight.zero_()
        layer.gate.weight[0, 0] = 10.0
    x = torch.randn(1, 8, cfg.d_model)
    x[..., 0] = x[..., 0].abs() + 1.0
    layer.eval()
    full = layer(x)
    assert float(layer.record.dropped) == 0.0
    layer.train()
    out = layer(x)
    cap = math.ceil(1.0 * 8 * 1 / 4)  # = 2: expert 0 serves the first two tokens only
    assert float(layer.record.dropped) == pytest.approx(1 - cap / 8)
    torch.testing.assert_close(out[0, :cap], full[0, :cap])
    assert torch.count_nonzero(out[0, cap:]) == 0  # dropped tokens add nothing (the residual carries them)


def test_top_k_greater_than_experts_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"'experts_top_k' \(3\) must be <= 'n_experts' \(2\)"):
        Transformer(_cfg(n_experts=2, experts_top_k=3))
    with pytest.raises(ConfigError, match="moe_router"):
        _cfg(moe_router="sinkhorn").validate()


def test_aux_and_z_loss_formulas():
    E, N = 4, 64
    uniform = torch.zeros(N, E)
    balanced_idx = torch.arange(N).remainder(E).unsqueeze(1)
    assert float(load_balancing_loss(uniform, balanced_idx)) == pytest.approx(1.0)
    collapsed = torch.zeros(N, E)
    collapsed[:, 0] = 20.0
    assert float(load_balancing_loss(collapsed, torch.zeros(N, 1, dtype=torch.long))) == pytest.approx(
        E, rel=1e-6
    )
    assert float(router_z_loss(uniform)) == pytest.approx(math.log(E) ** 2)


def test_aux_loss_matches_transformers_up_to_k():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    _, idx = route(logits, 2)
    hf = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert transformers is not None
    torch.testing.assert_close(load_balancing_loss(logits, idx) * 2, hf)


def test_aux_loss_gradient_rebalances_a_skewed_router():
    """Gradient steps on L_aux alone take a router that favours expert 0 to balanced routing."""
    torch.manual_seed(0)
    cfg = _cfg(n_layers=1, n_experts=4, experts_top_k=2)
    layer = Transformer(cfg).layers[0].mlp
    x = torch.randn(256, cfg.d_model) + 1.0  # a shared component, so one gate row can grab every token
    with torch.no_grad():
        layer.gate.weight[0] += 0.05
    opt = torch.optim.SGD(layer.gate.parameters(), lr=0.02)
    history = []
    for _ in range(21):
        layer(x)
        loss = load_balancing_loss(layer.record.logits, layer.record.expert_idx)
        history.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[0] > 1.3 and history[-1] < 1.02  # 1 = balanced, E/k = 2 = collapsed


def test_lm_loss_adds_router_losses_in_training_and_reports_load():
    torch.manual_seed(0)
    model = Transformer(_cfg(aux_loss_weight=0.5, router_z_loss_weight=0.1))
    ids = torch.randint(0, VOCAB, (2, 16))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    model.train()
    out = causal_lm_loss(model, batch)
    with torch.no_grad():
        ce = F.cross_entropy(
            model(batch["input_ids"]).reshape(-1, VOCAB), batch["labels"].reshape(-1), reduction="sum"
        )
    extra = (0.5 * out.metrics["moe_aux"] + 0.1 * out.metrics["moe_z"]) * out.weight
    torch.testing.assert_close(out.loss_sum.detach(), ce + extra, atol=1e-3, rtol=1e-5)
    assert float(out.metrics["moe_aux"]) >= 1.0 - 1e-5
    loads = [float(out.metrics[f"moe_load_e{i}"]) for i in range(4)]
    per_layer = expert_load(model)  # [layers, E]
    assert per_layer.shape == (2, 4) and sum(loads) == pytest.approx(1.0)
    torch.testing.assert_close(torch.tensor(loads), per_layer.mean(0))
    assert float(out.metrics["moe_load_max"]) == pytest.approx(4 * float(per_layer.max(1).values.mean()))
    model.eval()
    with torch.no_grad():
        held_out = causal_lm_loss(model, batch)
    torch.testing.assert_close(held_out.loss_sum, ce, atol=1e-3, rtol=1e-5)  # eval: pure cross-entropy
    assert "moe_dropped" in held_out.metrics


def test_dense_model_loss_is_untouched():
    torch.manual_seed(0)
    model = Transformer(_cfg(ffn="swiglu", d_ff=48))
    assert router_losses(model, 10.0) == (None, {})
    ids = torch.randint(0, VOCAB, (2, 12))
    out = causal_lm_loss(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    assert out.metrics == {}


def test_kv_cache_decode_and_engine_greedy_match_full_forward():
    from llmlab.infer import LLM, SamplingParams

    torch.manual_seed(0)
    model = Transformer(_cfg(shared_expert_d_ff=16, qk_norm=True)).eval()
    ids = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.cfg, batch_size=2, max_len=32)
        steps = [model(ids[:, :9], cache=cache)] + [
            model(ids[:, t : t + 1], cache=cache) for t in range(9, 14)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)

    llm = LLM.from_model(model, None)
    prompt = ids[0, :5].tolist()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.token_ids == seq[5:]


def test_flops_count_active_experts_only():
    dense = _cfg(ffn="swiglu", d_ff=24)
    moe = _cfg()  # 4 experts of 24, top-2: ~2x the dense MLP per token, plus the router
    d = dense.d_model
    diff = flops_per_token(moe, 32) - flops_per_token(dense, 32)
    assert diff == 3 * 2 * moe.n_layers * (3 * d * 24 + d * 4)


def test_qk_norm_default_off_and_normalizes_heads():
    assert not any("q_norm" in k for k in Transformer(_cfg(ffn="swiglu")).state_dict())
    torch.manual_seed(0)
    model = Transformer(_cfg(ffn="swiglu", qk_norm=True))
    attn = model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (model.cfg.dim_head,) and attn.k_norm.weight.shape == (
        model.cfg.dim_head,
    )
    seen = {}
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight.mul_(100.0)  # huge queries: normalized back to unit RMS
        model(torch.randint(0, VOCAB, (1, 8)))
    rms = seen["q"].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)


def test_moe_checkpoint_round_trip(tmp_path):
    import llmlab
    from llmlab.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = Transformer(_cfg(shared_expert_d_ff=16, capacity_factor=1.25, moe_router="topk_softmax")).eval()
    save_checkpoint(tmp_path / "ck", model)
    back, _ = llmlab.load(tmp_path / "ck")
    assert back.cfg == model.cfg
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids))


def test_cli_pretrain_top_k_above_experts_exits_2(tmp_path, capsys):
    from llmlab.cli import main

    rc = main(
        ["pretrain", "--out", str(tmp_path / "run"), "model.ffn=moe", "model.n_experts=2", "experts_top_k=3"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "'experts_top_k' (3) must be <= 'n_experts' (2)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_z_loss_and_mlm_losses_add_the_router_losses_too():
    """Every training loss adds an MoE model's router losses (not only the default causal-LM one)."""
    from llmlab.losses.lm import causal_lm_loss
    from llmlab.losses.mlm import mlm_loss
    from llmlab.losses.stability import causal_lm_z_loss

    torch.manual_seed(0)
    model = Transformer(_cfg(aux_loss_weight=0.5)).train()
    ids = torch.randint(0, VOCAB, (2, 16))
    batch = {"input_ids": ids, "labels": ids.clone()}
    plain = causal_lm_loss(model, batch)
    with_z = causal_lm_z_loss(model, batch, z_loss_weight=0.0)
    assert "moe_aux" in with_z.metrics
    assert float(with_z.loss_sum.detach()) == pytest.approx(float(plain.loss_sum.detach()), rel=1e-5)
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    masked = mlm_loss(model, {"input_ids": ids, "labels": labels})
    assert "moe_aux" in masked.metrics
