"""A leaner forward pass for inference over the same weights as :class:`~llmlab.model.Transformer`.

At batch 1 a small model's decode step is bound by per-op overhead on CPU (NOTES.md: ≈2.6 µs per tiny op,
30 layers), not by FLOPs. This path computes exactly the model's function with fewer ops per layer:

- q/k/v projections fused into one matmul, gate/up into one (the fused weights are built once and rebuilt
  automatically when the model's parameters change, e.g. between RL updates: every parameter's in-place
  version counter is checked before each forward);
- RoPE applied to q and k together, with ``rotate_half`` done as one ``roll`` against a sign-folded sine
  table (the same products, so the same values);
- no per-layer dtype casts.

At batch 1 the step is then bound by reading the weights (≈540 MB per token for SmolLM2-135M in fp32).
``weights="int8"`` trades exactness for bandwidth: every matmul weight (the tied LM head included) is stored
as int8 with one scale per output channel and multiplied by ``torch._weight_int8pack_mm`` with bf16
activations (NOTES.md: the fp32 GEMV kernels beat bf16 ones at M=1, but int8 reads 4x fewer bytes). Outputs
then differ slightly from the model's; the benchmark reports how many greedy tokens still agree.
``weights="int4"`` halves that again for the layer matmuls: asymmetric 4-bit groups of 32 (GGUF Q4_1's layout,
so a Q4_1 checkpoint loses little more than its bf16 scales: 0.3% relative error on SmolLM2's layers, vs 0.8%
for int8) through ``torch._weight_int4pack_mm_for_cpu``; the LM head stays int8.

**Quantized checkpoints** (``llmlab quantize`` output, loaded by ``llmlab.load``) run on the same kernels
from their own codes: ``Int8Linear`` rows and scales become the int8 weight, ``Int4Linear`` codes are
packed for the int4 kernel with the checkpoint's group size and zero points (``(q - 8) * s + bias_g``, as
``Int4Linear``'s own kernel). Fused q/k/v and gate/up are concatenated codes. The float LM head is stored
int8, as with ``weights="int8"/"int4"``. A layer with no kernel here (NF4, mixed schemes) is dequantized to
float once; a requested format other than the checkpoint's keeps the checkpoint's codes (re-quantizing would
add error). Both warn once.

It covers the families llmlab loads (RMSNorm/LayerNorm, SwiGLU/GELU, RoPE/learned/no positions, biases);
anything else (ALiBi, LoRA-wrapped projections, training mode) falls back to the model's own forward. The
tests check it is token-identical to ``Transformer.forward``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.model.transformer import KVCacheProtocol, RMSNorm, Transformer, activation_fn
from llmlab.quant.common import QuantLinear
from llmlab.quant.int4 import Int4Linear
from llmlab.quant.int8 import Int8Linear

WEIGHT_FORMATS = ("same", "int8", "int4")
INT4_GROUP = 32
# A float weight, (int8 weight, per-row bf16 scales), or (packed int4 weight, bf16 scales+zeros, out features,
# group size).
Weight = Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, int, int]


@dataclass
class _Layer:
    norm1: tuple[Tensor, Tensor | None]
    qkv_w: Weight
    qkv_b: Tensor | None
    o_w: Weight
    o_b: Tensor | None
    norm2: tuple[Tensor, Tensor | None]
    up_w: Weight  # gate and up stacked for SwiGLU
    up_b: Tensor | None
    down_w: Weight
    down_b: Tensor | None


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``w ≈ q * scale[:, None]``."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(torch.bfloat16)


def quantize_int4(
    w: Tensor, group: int = INT4_GROUP
) -> tuple[Tensor, Tensor, int, int] | tuple[Tensor, Tensor]:
    """Asymmetric int4 in groups of ``group`` inputs (the layout of GGUF's Q4_1): ``w ≈ (q - 8) * s + z``.

    Packed for ``torch._weight_int4pack_mm_for_cpu``; scales/zeros are ``[in/group, out, 2]`` bf16.
    """
    w = w.detach().float()
    n, k = w.shape
    if n % 16 or k % group:  # the packed kernel's shape rules: fall back to int8 for this matrix
        return quantize_int8(w)
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    zero = lo + 8 * scale
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros, n, group


def linear(x: Tensor, w: Weight, b: Tensor | None = None, cast: bool = True) -> Tensor:
    """``F.linear`` over a float, an int8 or an int4 weight (see :func:`quantize_int8` / :func:`quantize_int4`).

    The low-bit kernels return bf16; ``cast=False`` leaves it so for a caller that adds the result to an
    fp32 tensor (the residual stream): the add promotes it exactly, one op fewer per projection.
    """
    if isinstance(w, Tensor):
        return F.linear(x, w, b)
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if len(w) == 2:
        q, scale = w
        y, n = torch._weight_int8pack_mm(x2, q, scale), q.shape[0]
    else:
        packed, scales_zeros, n, group = w
        y = torch._weight_int4pack_mm_for_cpu(x2, packed, group, scales_zeros)
    y = (y.to(x.dtype) if cast else y).view(*x.shape[:-1], n)
    return y if b is None else y + b


def quantized_scheme(model: nn.Module) -> str | None:
    """``"int8"``/``"int4"`` when the model's linears are quantized with one kernel scheme, ``"mixed"`` for
    anything else quantized (NF4, several schemes), None for a float model."""
    kinds = {type(m) for m in model.modules() if isinstance(m, QuantLinear)}
    if not kinds:
        return None
    if kinds == {Int8Linear}:
        return "int8"
    if kinds == {Int4Linear}:
        return "int4"
    return "mixed"


def _int4_scales_zeros(m: Int4Linear) -> Tensor:
    """The int4 kernel's ``[K/g, N, 2]`` (scale, bias_g) for an ``Int4Linear``: the kernel computes
    ``(q - 8) * scale + bias_g``, so ``bias_g = (8 - zero) * scale`` (or ``8 * scale + offset`` for Q4_1-style
    float zeros), as in ``Int4Linear``'s own forward."""
    scale = m.scales.float()
    bias_g = 8 * scale + m.offsets.float() if m.float_zero else (8 - m.zeros.float()) * scale
    return torch.stack([scale.t(), bias_g.t()], dim=-1).to(torch.bfloat16)


def _fuse(mods: list[nn.Module], weights: str) -> Weight:
    """One (possibly quantized) weight for the row-wise concatenation of ``mods``' weights."""
    if all(type(m) is Int8Linear for m in mods):
        q = torch.cat([m.qweight for m in mods], dim=0).contiguous()
        return q, torch.cat([m.scales for m in mods]).to(torch.bfloat16)
    groups = {getattr(m, "group_size", None) for m in mods}
    if all(type(m) is Int4Linear for m in mods) and len(groups) == 1:
        n = sum(m.out_features for m in mods)
        if n % 16 == 0:
            codes = torch.cat([m.codes() for m in mods], dim=0).to(torch.int32)
            scales_zeros = torch.cat([_int4_scales_zeros(m) for m in mods], dim=1)
            return (
                torch._convert_weight_to_int4pack_for_cpu(codes, 1),
                scales_zeros.contiguous(),
                n,
                groups.pop(),
            )
    ws = [m.dequantize(torch.float32) if isinstance(m, QuantLinear) else m.weight.detach() for m in mods]
    w = ws[0] if len(ws) == 1 else torch.cat(ws)
    if weights == "int8" or (weights == "int4" and any(isinstance(m, QuantLinear) for m in mods)):
        return quantize_int8(w)  # a dequantized layer keeps ~int8 precision rather than losing more
    return quantize_int4(w) if weights == "int4" else w


def _supported(model: nn.Module) -> bool:
    if not isinstance(model, Transformer) or model.cfg.position == "alibi":
        return False
    if model.cfg.qk_norm or model.cfg.ffn == "moe":  # layers this fused path does not compute
        return False
    if getattr(model, "kv_prefix", None) is not None:  # prefix/prompt tuning: the model's own forward
        return False
    for layer in model.layers:
        mods = [
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.o_proj,
        ]
        mods += [layer.mlp.up_proj, layer.mlp.down_proj] + ([layer.mlp.gate_proj] if layer.mlp.gated else [])
        if any(type(m) is not nn.Linear and not isinstance(m, QuantLinear) for m in mods):
            return False
        if any(
            type(n) not in (RMSNorm, nn.LayerNorm)
            for n in (layer.input_layernorm, layer.post_attention_layernorm)
        ):
            return False
    return type(model.norm) in (RMSNorm, nn.LayerNorm)


class FastDecoder:
    """Fused-weight forward over a :class:`Transformer`'s live parameters (see the module docstring)."""

    def __init__(self, model: Transformer, weights: str = "same"):
        from llmlab.errors import LLMLabError

        if weights not in WEIGHT_FORMATS:
            raise LLMLabError(f"fast-path weights must be one of {list(WEIGHT_FORMATS)}, got {weights!r}")
        self.model = model
        self.weights = weights
        self.cfg = model.cfg
        self._params: list[nn.Parameter] | None = None
        self._verified = False  # the full staleness check passed since the last recheck()
        self._versions: list[tuple[int, int]] = []
        self._modules: list[tuple[nn.Module, str, nn.Module]] = []
        self.layers: list[_Layer] = []

    @classmethod
    def create(cls, model: nn.Module, weights: str = "same") -> FastDecoder | None:
        """A fast path for ``model``, or None (with a warning when the model is quantized or a quantized
        format was asked for: those are the cases where falling back costs a lot of speed)."""
        from llmlab.errors import LLMLabError

        if weights not in WEIGHT_FORMATS:
            raise LLMLabError(f"fast-path weights must be one of {list(WEIGHT_FORMATS)}, got {weights!r}")
        scheme = quantized_scheme(model)
        if not _supported(model):
            if scheme is not None or weights != "same":
                warnings.warn(
                    "this model cannot take the fast decode path (ALiBi, LoRA-wrapped or custom layers): "
                    f"fast={weights!r} is ignored and decoding runs the model's own, slower forward",
                    stacklevel=3,
                )
            return None
        if scheme == "mixed":
            warnings.warn(
                "this checkpoint's quantized layers have no fast kernel (NF4 or mixed schemes): the fast "
                "path runs them dequantized",
                stacklevel=3,
            )
        elif scheme is not None and weights not in ("same", scheme):
            warnings.warn(
                f"the checkpoint is already {scheme}-quantized: fast={weights!r} keeps its {scheme} codes "
                "(re-quantizing would add error)",
                stacklevel=3,
            )
        if scheme in ("int8", "int4"):
            weights = scheme  # the checkpoint's codes on the kernels, and an int8 LM head
        return cls(model, weights)

    # ------------------------------------------------------------------------------- weights
    def _fresh(self, model: nn.Module) -> bool:
        """Cheap check that nothing changed since ``_build``: same config object, same projection modules
        (a LoRA injection swaps them), same parameter storage at the same in-place version (an optimizer
        step or ``load_state_dict`` bumps the version; ``.to(dtype)`` swaps the storage)."""
        if self._params is None or model.cfg is not self.cfg:
            return False
        # ``_modules`` lookups, not nn.Module.__getattr__: this runs before every forward (~300 children).
        if any(parent._modules.get(name) is not mod for parent, name, mod in self._modules):
            return False
        return all((p._version, p.data_ptr()) == v for p, v in zip(self._params, self._versions, strict=True))

    def invalidate(self) -> None:
        """Forget the fused weights; the next forward rebuilds them from the model's parameters."""
        self._params = None
        self._verified = False

    def recheck(self) -> None:
        """Run the full staleness check at the next forward (the engine calls this when a new batch of
        work starts; within a batch only the cheap checks run: the full one walks every parameter)."""
        self._verified = False

    def usable(self, model: nn.Module) -> bool:
        """True when the fused weights match the model (rebuilding them if its parameters changed)."""
        if model.training:
            return False
        if self._verified and model.cfg is self.cfg:
            return True
        if not self._fresh(model):
            if not _supported(model):
                return False
            self._build(model)
        self._verified = True
        return True

    @torch.no_grad()
    def _build(self, model: Transformer) -> None:
        self.cfg = model.cfg

        def norm(n: nn.Module) -> tuple[Tensor, Tensor | None]:
            return n.weight.detach(), getattr(n, "bias", None)

        def cat(*ts: Tensor | None) -> Tensor | None:
            return None if ts[0] is None else torch.cat([t.detach() for t in ts], dim=0)

        def bias(m: nn.Module) -> Tensor | None:
            b = getattr(m, "bias", None)
            return None if b is None else b.detach().float() if isinstance(m, QuantLinear) else b

        self.layers = []
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            up = [m.gate_proj, m.up_proj] if m.gated else [m.up_proj]
            self.layers.append(
                _Layer(
                    norm1=norm(layer.input_layernorm),
                    qkv_w=_fuse([a.q_proj, a.k_proj, a.v_proj], self.weights),
                    qkv_b=cat(*(bias(p) for p in (a.q_proj, a.k_proj, a.v_proj))),
                    o_w=_fuse([a.o_proj], self.weights),
                    o_b=bias(a.o_proj),
                    norm2=norm(layer.post_attention_layernorm),
                    up_w=_fuse(up, self.weights),
                    up_b=cat(*(bias(p) for p in up)),
                    down_w=_fuse([m.down_proj], self.weights),
                    down_b=bias(m.down_proj),
                )
            )
        self.final_norm = norm(model.norm)
        head_mod = model.embed_tokens if model.lm_head is None else model.lm_head
        if isinstance(head_mod, QuantLinear):
            self.head: Weight = _fuse([head_mod], "int8" if self.weights != "same" else "same")
        else:
            head = head_mod.weight.detach()
            # The LM head stays int8 even in int4 mode: its errors move the argmax directly, and checkpoints
            # keep it at higher precision (SmolLM2's Q4_1 GGUF stores it as Q8_0: int4 would cost 10%).
            self.head = quantize_int8(head) if self.weights in ("int8", "int4") else head
        self._modules = [
            (parent, name, getattr(parent, name))
            for layer in model.layers
            for parent in (layer, layer.self_attn, layer.mlp)
            for name, _ in parent.named_children()
        ] + [(model, "norm", model.norm), (model, "embed_tokens", model.embed_tokens)]
        self._params = list(model.parameters())
        self._versions = [(p._version, p.data_ptr()) for p in self._params]

    def _norm(self, x: Tensor, wb: tuple[Tensor, Tensor | None]) -> Tensor:
        w, b = wb
        if self.cfg.norm == "rmsnorm":
            # As RMSNorm.forward: normalize in fp32, cast back, then scale.
            if x.dtype == torch.float32:  # the weight inside rms_norm: the same product, one op fewer
                return F.rms_norm(x, (x.shape[-1],), w, eps=self.cfg.norm_eps)
            return w.to(x.dtype) * F.rms_norm(x.float(), (x.shape[-1],), eps=self.cfg.norm_eps).to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), w, b, self.cfg.norm_eps)

    # ------------------------------------------------------------------------------- forward
    def forward(self, ids: Tensor, cache: KVCacheProtocol) -> Tensor:
        """Final hidden states ``[B, T, d]`` (after the last norm) for ``ids`` continuing ``cache``."""
        model, cfg = self.model, self.cfg
        B, T = ids.shape
        H, KV, hd = cfg.n_heads, cfg.kv_heads, cfg.dim_head
        meta = cache.prepare(T, cfg)
        x = model.embed_tokens(ids)
        if model.embed_positions is not None:
            if int(meta.q_pos.max()) >= cfg.max_seq_len:
                raise ValueError(f"position {int(meta.q_pos.max())} is past the learned position table")
            x = x + model.embed_positions(meta.q_pos)
        rope = None
        if model.rotary is not None:
            cos, sin = model.rotary(meta.q_pos)  # [B, 1, T, hd] fp32
            half = hd // 2
            # rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi]
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            rope = (cos.to(x.dtype), sin.to(x.dtype))
        act = activation_fn(cfg.activation)
        gated = cfg.ffn == "swiglu"
        mask, causal = meta.mask, meta.is_causal and meta.mask is None
        gqa = KV != H
        for i, L in enumerate(self.layers):
            h = self._norm(x, L.norm1)
            qkv = linear(h, L.qkv_w, L.qkv_b).view(B, T, H + 2 * KV, hd).transpose(1, 2)
            qk, v = qkv[:, : H + KV], qkv[:, H + KV :]
            if rope is not None:
                qk = qk * rope[0] + qk.roll(hd // 2, dims=-1) * rope[1]
            q, k = qk[:, :H], qk[:, H:]
            k, v = cache.update(i, k, v)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
            x = x + linear(o.transpose(1, 2).reshape(B, T, H * hd), L.o_w, L.o_b, cast=False)
            h = self._norm(x, L.norm2)
            u = linear(h, L.up_w, L.up_b)
            if gated:
                g, u = u.chunk(2, dim=-1)
                u = act(g) * u
            else:
                u = act(u)
            x = x + linear(u, L.down_w, L.down_b, cast=False)
        cache.advance(T)
        return self._norm(x, self.final_norm)

    def logits(self, hidden: Tensor) -> Tensor:
        """LM head over the (possibly int8) head weight."""
        return linear(hidden, self.head)
