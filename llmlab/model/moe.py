"""The mixture-of-experts feed-forward layer (``ffn="moe"``): a top-k router over E SwiGLU experts.

Per token ``x`` (``d_model``), with router weight ``W_r [E, d]``:

- ``softmax_topk`` (Mixtral, Qwen-MoE): ``p = softmax(W_r x)``; keep the k largest ``p_e``; with
  ``norm_topk_prob`` divide them by their sum (Mixtral always does; Qwen's configs say).
- ``topk_softmax``: keep the k largest logits and softmax over those k only. This equals ``softmax_topk`` with
  ``norm_topk_prob`` (the partition function cancels), one op shorter; the tests check the equality.
- output ``y = sum_{e in topk} w_e * SwiGLU_e(x)``, plus, with ``shared_expert_d_ff > 0``, Qwen2-MoE's shared
  expert every token visits, scaled by a learned sigmoid gate: ``+ sigmoid(g . x) * SwiGLU_shared(x)``.

**Grouped computation.** The N*k (token, expert) assignments are sorted by expert, so each expert's tokens
form one contiguous slice; the experts' three projections then run as grouped matmuls over those slices
(``F.grouped_mm`` where the device supports it, else one matmul per expert on its slice): E matmuls of
total size N*k, never a loop over tokens nor the dense E-fold compute.

**Capacity.** With ``capacity_factor`` c, each expert takes at most ``ceil(c * N * k / E)`` assignments
per forward; the rest are dropped (that expert adds nothing for that token; the residual stream carries the
token on). First choices are served before second choices, then in token order (GShard's priority).
Dropping only happens in training: at inference every token reaches its k experts, so the output does not
depend on what else is in the batch (and KV-cache decoding equals the full forward).

Each forward leaves its router logits and choices on the layer (:class:`RouterRecord`), for the auxiliary
losses and load statistics of :mod:`llmlab.losses.moe`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.model.config import ModelConfig


@dataclass
class RouterRecord:
    """What one MoE layer's last forward decided (read by :mod:`llmlab.losses.moe`)."""

    logits: Tensor  # [N, E] router logits (with grad in training)
    expert_idx: Tensor  # [N, k] chosen experts
    dropped: Tensor  # scalar: fraction of the N*k assignments dropped by the capacity limit


def route(logits: Tensor, top_k: int, mode: str = "softmax_topk", norm_topk_prob: bool = True):
    """``(weights [N, k] fp32, expert_idx [N, k])`` from router logits ``[N, E]`` (see the module docstring)."""
    if mode == "topk_softmax":
        top, idx = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(top.float(), dim=-1), idx
    probs = torch.softmax(logits.float(), dim=-1)
    weights, idx = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx


def _grouped_linear(x: Tensor, weight: Tensor, sizes: Tensor, offsets: Tensor) -> Tensor:
    """``x [M, in]`` (rows sorted by group) times ``weight[g].T`` (``weight [G, out, in]``) per group slice."""
    weight = weight.to(x.dtype)
    # CPU takes any float dtype; CUDA's kernel wants bf16 (and aligned sizes, which tiny models may lack).
    if x.device.type == "cpu" and hasattr(F, "grouped_mm"):
        return F.grouped_mm(x, weight.transpose(-1, -2), offs=offsets)
    parts = [F.linear(chunk, weight[g]) for g, chunk in enumerate(x.split(sizes.tolist()))]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


class Experts(nn.Module):
    """E SwiGLU experts as 3-D weights: ``gate_proj``, ``up_proj [E, I, d]``, ``down_proj [E, d, I]``."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, act: Callable[[Tensor], Tensor]):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.act = act

    def init_weights(self, std: float, n_layers: int) -> None:
        """As the dense MLP: N(0, std), the residual output projection scaled by 1/sqrt(2 * layers)."""
        nn.init.normal_(self.gate_proj, std=std)
        nn.init.normal_(self.up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std / math.sqrt(2 * n_layers))

    def forward(self, x: Tensor, sizes: Tensor) -> Tensor:
        """``x [M, d]`` sorted by expert, ``sizes [E]`` rows per expert -> ``[M, d]``."""
        offsets = torch.cumsum(sizes, 0).to(torch.int32)
        h = self.act(_grouped_linear(x, self.gate_proj, sizes, offsets))
        h = h * _grouped_linear(x, self.up_proj, sizes, offsets)
        return _grouped_linear(h, self.down_proj, sizes, offsets)


class SharedExpert(nn.Module):
    """One SwiGLU FFN every token visits (Qwen2-MoE's ``shared_expert``; HF module names)."""

    def __init__(self, d_model: int, hidden: int, act: Callable[[Tensor], Tensor]):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """``ffn="moe"``: router ``gate`` + :class:`Experts` (+ ``shared_expert`` and its ``shared_expert_gate``).

    Module names follow HF Qwen2-MoE (``mlp.gate``, ``mlp.experts``, ``mlp.shared_expert``,
    ``mlp.shared_expert_gate``), so the interop is a rename of the per-expert checkpoint tensors.
    """

    def __init__(self, cfg: ModelConfig, act: Callable[[Tensor], Tensor]):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.experts_top_k
        self.router_mode, self.norm_topk_prob = cfg.moe_router, cfg.norm_topk_prob
        self.capacity_factor = cfg.capacity_factor
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.expert_dim, act)
        if cfg.shared_expert_d_ff > 0:
            self.shared_expert = SharedExpert(cfg.d_model, cfg.shared_expert_d_ff, act)
            self.shared_expert_gate = nn.Linear(cfg.d_model, 1, bias=False)
        else:
            self.shared_expert = None
        self.record: RouterRecord | None = None

    def capacity(self, n_tokens: int) -> int | None:
        """Most assignments one expert takes in this forward (None: unlimited)."""
        if self.capacity_factor is None or not self.training:
            return None
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        N, k, E = flat.shape[0], self.top_k, self.n_experts
        logits = self.gate(flat)
        weights, idx = route(logits, k, self.router_mode, self.norm_topk_prob)
        # Rank-major order (every token's first choice, then every second choice) so a stable sort by
        # expert puts first choices ahead when a capacity limit cuts an expert's slice.
        expert_of = idx.t().reshape(-1)
        token_of = torch.arange(N, device=x.device).repeat(k)
        weight_of = weights.t().reshape(-1)
        order = torch.argsort(expert_of, stable=True)
        sizes = torch.bincount(expert_of, minlength=E)
        dropped = flat.new_zeros((), dtype=torch.float32)
        cap = self.capacity(N)
        if cap is not None:
            starts = torch.cumsum(sizes, 0) - sizes
            slot = torch.arange(N * k, device=x.device) - starts[expert_of[order]]
            keep = slot < cap
            order = order[keep]
            sizes = sizes.clamp(max=cap)
            dropped = 1.0 - keep.float().mean()
        tokens = token_of[order]
        y = self.experts(flat[tokens], sizes)
        y = y * weight_of[order].unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(flat, dtype=y.dtype).index_add_(0, tokens, y)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * shared
        self.record = RouterRecord(logits=logits, expert_idx=idx, dropped=dropped)
        return out.to(x.dtype).reshape(shape)


def active_mlp_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies in an MoE layer: router, its k experts, the shared expert and its gate."""
    d = cfg.d_model
    n = d * cfg.n_experts + cfg.experts_top_k * 3 * d * cfg.expert_dim
    if cfg.shared_expert_d_ff > 0:
        n += 3 * d * cfg.shared_expert_d_ff + d
    return n


def total_mlp_params(cfg: ModelConfig) -> int:
    """All weights of one MoE layer (every expert)."""
    return active_mlp_params(cfg) + (cfg.n_experts - cfg.experts_top_k) * 3 * cfg.d_model * cfg.expert_dim


__all__ = ["MoE", "Experts", "RouterRecord", "SharedExpert", "active_mlp_params", "route", "total_mlp_params"]
