"""The Transformer itself: cache/decode equivalence, masking, packing, config validation, accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.errors import ConfigError
from llmlab.model import KVCache, ModelConfig, RopeScaling, Transformer, flops_per_token
from llmlab.model.transformer import alibi_slopes

VARIANTS = {
    "llama-gqa": {},
    "mqa": {"n_kv_heads": 1},
    "qwen2-bias-window": {"qkv_bias": True, "sliding_window": 6},
    "gpt2": {
        "position": "learned",
        "norm": "layernorm",
        "norm_bias": True,
        "ffn": "gelu",
        "activation": "gelu_tanh",
        "qkv_bias": True,
        "out_bias": True,
        "mlp_bias": True,
    },
    "alibi": {"position": "alibi"},
    "yarn": {"rope_scaling": RopeScaling(type="yarn", factor=4.0, original_max_seq_len=32)},
    "llama3": {"rope_scaling": RopeScaling(type="llama3", factor=8.0, original_max_seq_len=32)},
    "ntk": {"rope_scaling": RopeScaling(type="ntk", factor=2.0)},
    "untied": {"tie_embeddings": False},
}


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_incremental_decode_matches_full_forward(variant):
    torch.manual_seed(0)
    cfg = tiny(**VARIANTS[variant])
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(cfg, batch_size=2, max_len=64)
        steps = [model(ids[:, :9], cache=cache)]  # prefill, then one token at a time
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(9, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_and_ragged_rows_match_full_forward():
    """Rows of different lengths in one cache, each written at its own offset, chunked prefill."""
    torch.manual_seed(1)
    cfg = tiny(sliding_window=5)
    model = Transformer(cfg).eval()
    a, b = torch.randint(0, 97, (1, 20)), torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        cache = KVCache(cfg, batch_size=2, max_len=32)
        model(torch.cat([a[:, :4], b[:, :4]]), cache=cache)
        out = model(torch.cat([a[:, 4:8], b[:, 4:8]]), cache=cache)  # chunk of 4 at offset 4
        torch.testing.assert_close(out[0], full_a[0, 4:8], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], full_b[0, 4:8], atol=1e-5, rtol=1e-5)
        # Now make the rows ragged: pretend row 1 has only 6 tokens (drop its last 2) and decode one token.
        cache.lengths[1] = 6
        step = model(torch.cat([a[:, 8:9], b[:, 6:7]]), cache=cache)
        torch.testing.assert_close(step[0, 0], full_a[0, 8], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step[1, 0], full_b[0, 6], atol=1e-5, rtol=1e-5)


def test_left_padding_matches_unpadded():
    torch.manual_seed(2)
    cfg = tiny()
    model = Transformer(cfg).eval()
    short = torch.randint(0, 97, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = model(short)
        out = model(padded, attention_mask=mask)
    torch.testing.assert_close(out[:, 3:], ref, atol=1e-5, rtol=1e-5)


def test_packed_documents_do_not_attend_across_boundaries():
    torch.manual_seed(3)
    cfg = tiny()
    model = Transformer(cfg).eval()
    d1, d2 = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 9))
    packed = torch.cat([d1, d2], dim=1)
    segments = torch.tensor([[0] * 6 + [1] * 9])
    positions = torch.tensor([list(range(6)) + list(range(9))])
    with torch.no_grad():
        out = model(packed, positions=positions, segment_ids=segments)
        torch.testing.assert_close(out[:, :6], model(d1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 6:], model(d2), atol=1e-5, rtol=1e-5)


def test_sliding_window_matches_explicit_reference():
    """Attention with window W: query i sees keys j with i - W < j <= i (the Mistral convention)."""
    torch.manual_seed(4)
    cfg = tiny(n_layers=1, sliding_window=3, n_kv_heads=4)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 97, (1, 10))
    attn = model.layers[0].self_attn
    x = model.layers[0].input_layernorm(model.embed_tokens(ids))
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, 4, 16).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, 4, 16).transpose(1, 2)
    cos, sin = model.rotary(torch.arange(T)[None])
    from llmlab.model.rope import apply_rope

    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j < 3)), float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 64))
    h = model.embed_tokens(ids) + ref
    h = h + model.layers[0].mlp(model.layers[0].post_attention_layernorm(h))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model.logits(model.norm(h)), atol=1e-5, rtol=1e-5)


def test_gqa_equals_repeated_kv_heads():
    """A GQA model equals the MHA model whose k/v heads are repeated."""
    torch.manual_seed(5)
    gqa = Transformer(tiny(n_kv_heads=2)).eval()
    mha = Transformer(tiny(n_kv_heads=4)).eval()
    state = gqa.state_dict()
    for name, value in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = value.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert alibi_slopes(6).shape == (6,)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"n_heads": 5}, "n_heads"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"norm": "batchnorm"}, "norm"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_impossible_shapes_are_rejected_by_name(kw, key):
    with pytest.raises(ConfigError, match=key):
        Transformer(tiny(**kw))


def test_param_count_and_flops():
    cfg = tiny(tie_embeddings=False)
    model = Transformer(cfg)
    d, f, L, V = 64, cfg.ffn_dim, 2, 97
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * d * f + 2 * d
    assert model.num_params() == 2 * V * d + L * per_layer + d
    assert model.num_params(exclude_embeddings=True) == V * d + L * per_layer + d
    matmul_params = L * (64 * 64 * 2 + 2 * 64 * 32 + 3 * d * f) + d * V
    assert flops_per_token(cfg, 16) == 6 * matmul_params + 12 * L * 4 * 16 * 16


def test_training_step_reduces_loss_in_bf16_autocast():
    torch.manual_seed(6)
    cfg = tiny()
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 33))
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_single_norm_output_cast_under_autocast_matches_per_projection_casts(monkeypatch):
    """Blocks cast a norm's output to bf16 once for q/k/v (gate/up) instead of once per projection: same
    logits exactly, same gradients up to the order of bf16 gradient sums."""
    import llmlab.model.transformer as tm

    torch.manual_seed(0)
    model = Transformer(tiny())
    ids = torch.randint(0, 97, (2, 16))
    results = []
    for single_cast in (False, True):
        if not single_cast:
            monkeypatch.setattr(tm, "_autocast_input", lambda h, *consumers: h)
        else:
            monkeypatch.undo()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids)
        logits.float().square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (ref_logits, ref_grads), (logits, grads) = results
    assert torch.equal(logits, ref_logits)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------------- CPU attention under compile
@pytest.mark.parametrize("n_heads,n_kv_heads,q_len,k_len", [(6, 6, 64, 64), (8, 2, 32, 32), (4, 4, 16, 40)])
def test_cpu_compiled_attention_matches_fp32_sdpa(n_heads, n_kv_heads, q_len, k_len):
    """The explicit bf16 attention used under torch.compile on a CPU: outputs and all three gradients agree
    with fp32 SDPA to bf16 rounding (MHA, GQA, and queries aligned to the end of a longer key range)."""
    from llmlab.model.transformer import CausalAttentionCPU, causal_bias_table

    torch.manual_seed(0)
    q = torch.randn(2, n_heads, q_len, 32).bfloat16().requires_grad_()
    k, v = (torch.randn(2, n_kv_heads, k_len, 32).bfloat16().requires_grad_() for _ in range(2))
    grad_out = torch.randn(2, n_heads, q_len, 32)
    bias = causal_bias_table(k_len)[k_len - q_len :]  # the last query sees every key
    out = CausalAttentionCPU.apply(q, k, v, bias)
    out.float().backward(grad_out)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=allowed, enable_gqa=n_kv_heads != n_heads)
    ref.backward(grad_out)
    assert (out.float() - ref).abs().max() < 0.03
    for got, want in zip((q, k, v), ref_in):
        assert got.grad.shape == want.grad.shape
        assert (got.grad.float() - want.grad).abs().max() < 0.02 * want.grad.abs().max()


def test_cpu_attention_kernel_is_used_only_for_compiled_bf16_causal_attention(monkeypatch):
    """Routing: the explicit kernel replaces SDPA only while compiling, in bf16, with a plain causal mask and
    no KV cache; padding masks, fp32 and eager calls keep SDPA."""
    from llmlab.model import transformer as tf

    calls = []
    real = tf.CausalAttentionCPU.apply
    monkeypatch.setattr(tf.CausalAttentionCPU, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    )
    ids = torch.randint(0, 64, (2, 16))
    eager_bf16 = model.to(torch.bfloat16)(ids)
    assert not calls
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled_bf16 = model(ids)
    assert len(calls) == 2  # one per layer
    assert (compiled_bf16.float() - eager_bf16.float()).abs().max() < 0.1
    padded = torch.ones(2, 16, dtype=torch.long)
    padded[0, :4] = 0
    model(ids, attention_mask=padded)
    model.float()(ids)
    assert len(calls) == 2
    from llmlab.model.transformer import EXPLICIT_ATTENTION_MAX_LEN

    long_cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=2 * EXPLICIT_ATTENTION_MAX_LEN
    )
    Transformer(long_cfg).to(torch.bfloat16)(torch.randint(0, 64, (1, EXPLICIT_ATTENTION_MAX_LEN + 8)))
    assert len(calls) == 2  # past the cap SDPA's flash kernel is faster
