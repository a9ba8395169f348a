"""The one decoder-only Transformer of llmlab.

``Transformer(cfg)(input_ids) -> logits [B, T, vocab]``. Module names follow transformers' Llama layout
(``layers.N.self_attn.q_proj`` ...) so LoRA target names and PEFT adapter keys map one to one.

Attention always goes through ``F.scaled_dot_product_attention``. Which keys a query may see is described
by :class:`AttnMeta` (query positions, key positions, key validity); the model turns that into the fast
``is_causal`` path when it can and into an explicit mask when it must (padding, packed documents, a sliding
window, a KV cache with rows of different lengths, ALiBi).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.errors import ConfigError
from llmlab.model.config import ModelConfig
from llmlab.model.moe import Experts, MoE, active_mlp_params
from llmlab.model.rope import RotaryEmbedding, apply_rope


@dataclass
class AttnMeta:
    """Which keys each query attends to, shared by all layers of one forward pass.

    ``q_pos [B, T]`` are the absolute positions of the new tokens (used by RoPE/learned positions).
    ``mask`` is ``None`` for plain causal attention over exactly the new tokens (``is_causal``), else a
    bool ``[B, 1, T, S]`` (True = may attend) or, with ALiBi, an additive float mask.
    """

    q_pos: Tensor
    mask: Tensor | None
    is_causal: bool
    # Plain causal attention without a cache, on a context CausalAttentionCPU serves: its [T, T] additive mask.
    causal_bias: Tensor | None = None


class KVCacheProtocol(Protocol):
    """What the model needs from a KV cache (contiguous or paged).

    ``prepare(T)`` is called once per forward with the number of new tokens and returns their
    :class:`AttnMeta`; ``update(layer, k, v)`` stores the new keys/values (``[B, kv_heads, T, head_dim]``)
    and returns all keys/values the new queries may see; ``advance(T)`` commits the new tokens.
    """

    def prepare(self, num_new: int, cfg: ModelConfig) -> AttnMeta: ...

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...

    def advance(self, num_new: int) -> None: ...


def build_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    k_valid: Tensor | None = None,
    sliding_window: int | None = None,
    q_seg: Tensor | None = None,
    k_seg: Tensor | None = None,
    causal: bool = True,
) -> Tensor:
    """Bool mask ``[B, 1, T, S]``: causal by position (or, ``causal=False``, bidirectional), optionally
    windowed (``|q - k| < window`` when bidirectional), padded and per-document."""
    distance = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
    if sliding_window is not None:
        allowed &= (distance if causal else distance.abs()) < sliding_window
    if k_valid is not None:
        allowed &= k_valid[:, None, :]
    if q_seg is not None and k_seg is not None:
        allowed &= q_seg[:, :, None] == k_seg[:, None, :]
    return allowed.unsqueeze(1)


def alibi_slopes(n_heads: int) -> Tensor:
    """Geometric head slopes from the ALiBi paper (with its rule for non-powers of two)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32 (as transformers does) and come back to the input dtype.
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight.to(x.dtype) * out


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.norm_bias)


def activation_fn(name: str):
    return {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }[name]


# Longest context the explicit CPU attention serves. bench/attention_cpu.py, 2 threads, 2048 tokens per batch:
# 1.9x faster than SDPA at T=256, 1.5x at 512, even at 1024 (where its [B, H, T, T] tensors also grow large).
EXPLICIT_ATTENTION_MAX_LEN = 512


def causal_bias_table(n: int) -> Tensor:
    """``[n, n]`` additive causal mask (0 on and below the diagonal, -inf above) for CausalAttentionCPU.

    Kept as a model buffer so the compiled graph *loads* it: a mask built inside the graph is recomputed
    from indices in every pass of the softmax, which made that kernel 2.3x slower.
    """
    return torch.full((n, n), float("-inf")).triu(1)


def model_causal_bias(cfg: ModelConfig) -> Tensor:
    """The model's ``causal_bias`` buffer: the table for every context the explicit kernel serves."""
    return causal_bias_table(min(cfg.max_seq_len, EXPLICIT_ATTENTION_MAX_LEN))


class CausalAttentionCPU(torch.autograd.Function):
    """Causal bf16 attention as two batched matmuls around an fp32 softmax, with a hand-written backward.

    Only for ``torch.compile`` on a CPU: there inductor fuses the mask, softmax and the backward's
    elementwise work, and the four batched matmuls run on the bf16 matrix units. SDPA's CPU flash kernel
    spends ~5x its forward time in the backward; at 256 tokens this path is ~1.9x faster per layer
    (bench/attention_cpu.py) and took the compiled 14M training step from ~305 to ~255 ms. The scores are
    bf16 before the softmax, as in transformers' "eager" attention; the probabilities are kept (bf16) for
    the backward instead of being recomputed, which is cheap at the context lengths a CPU trains at.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """``q [B, H, T, D]``, ``k, v [B, KV, T, D]``, ``bias`` the ``[T, T]`` additive causal mask."""
        ctx.groups = q.shape[1] // k.shape[1]
        if ctx.groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
            k = k.repeat_interleave(ctx.groups, dim=1)
            v = v.repeat_interleave(ctx.groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        probs = torch.softmax(scores + bias, dim=-1).to(q.dtype)
        ctx.save_for_backward(q, k, v, probs)
        return torch.matmul(probs, v)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, probs = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        grad_probs = torch.matmul(grad_out, v.transpose(-1, -2)).float()
        p = probs.float()
        # softmax backward: dS = P * (dP - rowsum(P * dP))
        grad_scores = (p * (grad_probs - (p * grad_probs).sum(-1, keepdim=True)) * scale).to(q.dtype)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        if ctx.groups > 1:  # sum the expanded heads' gradients back onto their shared KV head
            B, H, S, D = grad_k.shape
            grad_k = grad_k.view(B, H // ctx.groups, ctx.groups, S, D).sum(2)
            grad_v = grad_v.view(B, H // ctx.groups, ctx.groups, S, D).sum(2)
        return grad_q, grad_k, grad_v, None


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool
) -> tuple[Tensor, Tensor]:
    """SDPA's math written out, returning ``(output [B, H, T, D], probabilities [B, H, T, S])``.

    ``softmax(q k^T / sqrt(D) + mask) v`` with the same mask conventions as ``scaled_dot_product_attention``
    (bool: True = may attend; float: additive; ``is_causal``: the lower triangle, top-left aligned as SDPA's)
    and grouped-query heads expanded. Used when a caller asks the model for its attention maps
    (``return_attention=True``); no dropout, so it is an inference path. fp32 softmax, as SDPA's CPU kernel.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    T, S = scores.shape[-2:]
    if is_causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        )
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype), probs


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.dim_head
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.out_bias)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm of q and k (names and shapes as in HF Qwen3)
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout
        self.use_rope = cfg.position == "rope"

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        meta: AttnMeta,
        cache: KVCacheProtocol | None,
        weights_out: list[Tensor] | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        mask = meta.mask
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        if weights_out is not None:
            out, probs = explicit_attention(q, k, v, mask, meta.is_causal and mask is None)
            weights_out.append(probs)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        if (
            meta.causal_bias is not None
            and cache is None
            and q.device.type == "cpu"
            and q.dtype == torch.bfloat16
            and torch.compiler.is_compiling()
            and not (self.training and self.dropout > 0)
        ):
            out = CausalAttentionCPU.apply(q, k, v, meta.causal_bias)
            out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
            return self.o_proj(out)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=meta.is_causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.ffn == "swiglu"
        hidden = cfg.ffn_dim
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.mlp_bias)
        self.act = activation_fn(cfg.activation)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MoE(cfg, activation_fn(cfg.activation)) if cfg.ffn == "moe" else MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        rope,
        meta: AttnMeta,
        cache: KVCacheProtocol | None,
        weights_out: list[Tensor] | None = None,
    ) -> Tensor:
        attn, mlp = self.self_attn, self.mlp
        h = _autocast_input(self.input_layernorm(x), attn.q_proj, attn.k_proj, attn.v_proj)
        x = x + self.dropout(attn(h, rope, meta, cache, weights_out))
        ffn_in = (mlp.gate,) if isinstance(mlp, MoE) else (mlp.up_proj, getattr(mlp, "gate_proj", None))
        h = _autocast_input(self.post_attention_layernorm(x), *ffn_in)
        return x + self.dropout(mlp(h))


def _autocast_input(h: Tensor, *consumers: nn.Module | None) -> Tensor:
    """``h`` in the autocast dtype when autocast is on and only plain ``nn.Linear`` layers read it.

    The residual stream and the norms stay fp32 under autocast, so each projection would cast the same norm
    output to bf16 by itself (q, k and v: three casts forward, three back). Casting once here gives the same
    bf16 inputs, so the same forward values, with one copy instead of three (two for gate/up). Adapted or
    quantized layers (LoRA, NF4, int8) keep receiving what they always did.
    """
    dev = h.device.type
    if not torch.is_autocast_enabled(dev) or h.dtype == torch.get_autocast_dtype(dev):
        return h
    if any(m is not None and type(m) is not nn.Linear for m in consumers):
        return h
    return h.to(torch.get_autocast_dtype(dev))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        )
        self.rotary = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        if cfg.position == "alibi":
            self.register_buffer("alibi", alibi_slopes(cfg.n_heads), persistent=False)
        self.register_buffer("causal_bias", model_causal_bias(cfg), persistent=False)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = (
                    1.0 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj", "down_proj")) else 1.0
                )
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, Experts):  # MoE experts keep their weights as [E, out, in] tensors
                module.init_weights(std, self.cfg.n_layers)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    # -------------------------------------------------------------------------------------- forward
    def attn_meta(
        self,
        B: int,
        T: int,
        device: torch.device,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> AttnMeta:
        """Attention layout of a forward pass without a cache."""
        if positions is None:
            positions = torch.arange(T, device=device).unsqueeze(0).expand(B, T)
            if attention_mask is not None:
                # Left padding: count positions from the first real token, as transformers does.
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        window = self.cfg.sliding_window
        needs_mask = (
            attention_mask is not None
            or segment_ids is not None
            or (window is not None and T > window)
            or self.cfg.position == "alibi"
        )
        if not needs_mask and not self.cfg.causal:  # an encoder: every query sees every key
            return AttnMeta(q_pos=positions, mask=None, is_causal=False)
        if not needs_mask:
            bias = self.causal_bias[:T, :T] if T <= self.causal_bias.shape[0] else None
            return AttnMeta(q_pos=positions, mask=None, is_causal=True, causal_bias=bias)
        idx = torch.arange(T, device=device).unsqueeze(0).expand(B, T)
        valid = attention_mask.bool() if attention_mask is not None else None
        mask = build_mask(idx, idx, valid, window, segment_ids, segment_ids, causal=self.cfg.causal)
        if valid is not None:
            # Fully padded query rows would give NaN; let them see themselves (their outputs are ignored).
            mask |= torch.eye(T, dtype=torch.bool, device=device)[None, None]
        return AttnMeta(q_pos=positions, mask=self._alibi(mask, idx, idx), is_causal=False)

    def _alibi(self, mask: Tensor, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        if self.cfg.position != "alibi":
            return mask
        dist = (k_idx[:, None, :] - q_idx[:, :, None]).float()  # <= 0 for visible keys
        if not self.cfg.causal:
            dist = -dist.abs()  # bidirectional ALiBi: the penalty grows with distance on both sides
        bias = self.alibi.to(mask.device)[None, :, None, None] * dist[:, None]
        return bias.masked_fill(~mask, float("-inf"))

    def forward(
        self,
        input_ids: Tensor,
        *,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        cache: KVCacheProtocol | None = None,
        return_hidden: bool = False,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits ``[B, T, vocab]`` (or final hidden states with ``return_hidden``).

        - ``positions [B, T]``: explicit positions (packed documents restart at 0).
        - ``attention_mask [B, T]``: 1 for real tokens, 0 for padding (no cache).
        - ``segment_ids [B, T]``: packed-document ids; attention never crosses a document boundary.
        - ``cache``: a KV cache (see :class:`KVCacheProtocol`) for incremental decoding.
        - ``return_attention``: also return each layer's attention probabilities ``[B, H, T, S]`` (a list,
          one per layer), computed by :func:`explicit_attention` (the same math as SDPA, written out) instead
          of the fused kernel; for analysis, not training.
        """
        B, T = input_ids.shape
        if cache is not None and not self.cfg.causal:
            raise ConfigError(
                "model config 'causal' is false: a bidirectional (MLM) model cannot decode left to right "
                "with a KV cache; generate with a causal model"
            )
        if getattr(self, "kv_prefix", None) is not None:  # prefix/prompt tuning: llmlab.model.peft.prefix
            cache = self.kv_prefix.wrap(self, cache, input_ids, positions, attention_mask, segment_ids)
        if cache is not None:
            meta = cache.prepare(T, self.cfg)
            if self.cfg.position == "alibi":
                # ALiBi needs an explicit bias even where the cache would use the mask-free fast path.
                mask = meta.mask
                S = mask.shape[-1] if mask is not None else int(meta.q_pos.max()) + 1
                k_idx = torch.arange(S, device=input_ids.device).unsqueeze(0).expand(B, S)
                if mask is None:
                    mask = build_mask(meta.q_pos, k_idx)
                meta = AttnMeta(meta.q_pos, self._alibi(mask, meta.q_pos, k_idx), False)
        else:
            meta = self.attn_meta(B, T, input_ids.device, positions, attention_mask, segment_ids)
        x = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            if int(meta.q_pos.max()) >= self.cfg.max_seq_len:
                raise ValueError(
                    f"position {int(meta.q_pos.max())} is past the learned position table ({self.cfg.max_seq_len})"
                )
            x = x + self.embed_positions(meta.q_pos)
        rope = self.rotary(meta.q_pos) if self.rotary is not None else None
        weights: list[Tensor] | None = [] if return_attention else None
        for layer in self.layers:
            x = layer(x, rope, meta, cache, weights)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        out = x if return_hidden else self.logits(x)
        return (out, weights) if weights is not None else out

    def logits(self, hidden: Tensor) -> Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden)  # a module call, so a quantized or adapted head works too
        return F.linear(hidden, self.embed_tokens.weight)

    # ---------------------------------------------------------------------------------- accounting
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
            if self.embed_positions is not None:
                n -= self.embed_positions.weight.numel()
        return n


def num_params(model: Transformer, exclude_embeddings: bool = False) -> int:
    return model.num_params(exclude_embeddings)


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token (PaLM appendix B): ``6N + 12 L H d_head T`` for training, a third for inference.

    N counts every weight matrix that is multiplied, the output head included (also when tied to the
    embedding, since the head matmul is still done) but not embedding look-ups. The attention term counts the
    full T x T score and value matmuls, as nanoGPT and PaLM do; with a sliding window W a query meets at most
    W keys, so T becomes min(T, W).
    """
    d, L = cfg.d_model, cfg.n_layers
    hd, H, KV = cfg.dim_head, cfg.n_heads, cfg.kv_heads
    attn_params = d * H * hd + 2 * d * KV * hd + H * hd * d
    mlp_params = (3 if cfg.ffn == "swiglu" else 2) * d * cfg.ffn_dim
    if cfg.ffn == "moe":  # only what a token visits: the router, its k experts, the shared expert
        mlp_params = active_mlp_params(cfg)
    n = L * (attn_params + mlp_params) + d * cfg.vocab_size
    span = min(seq_len, cfg.sliding_window) if cfg.sliding_window else seq_len
    per_token_fwd = 2 * n + 4 * L * H * hd * span
    return 3 * per_token_fwd if training else per_token_fwd
