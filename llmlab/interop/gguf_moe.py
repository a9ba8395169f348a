"""GGUF import of llama.cpp's QK-norm and mixture-of-experts layouts (used by :mod:`llmlab.interop.gguf`).

Architectures: ``qwen3`` (dense with ``attn_q_norm``/``attn_k_norm``), ``qwen2moe`` (experts plus a gated
shared expert), ``qwen3moe`` (experts, QK-norm) and ``llama`` with ``llama.expert_count`` (Mixtral).

- **metadata**: ``{arch}.expert_count`` -> ``n_experts``, ``expert_used_count`` -> ``experts_top_k``,
  ``expert_feed_forward_length`` -> ``moe_d_ff`` (Mixtral's experts use ``feed_forward_length``),
  ``expert_shared_feed_forward_length`` -> ``shared_expert_d_ff``, ``expert_weights_norm`` ->
  ``norm_topk_prob`` (absent: llama.cpp's per-arch default, true except for qwen2moe). Only softmax gating
  (``expert_gating_func`` 1 or absent) maps onto llmlab's router.
- **tensors**: the experts are already stacked, ``blk.N.ffn_{gate,up,down}_exps`` ``[E, out, in]`` as
  llmlab keeps them; ``ffn_gate_inp`` is the router, ``ffn_*_shexp`` the shared expert and
  ``ffn_gate_inp_shexp`` its gate (stored 1-D or ``[1, d]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from llmlab.errors import CheckpointError

GGUF_EXTRA_ARCHS = ("qwen3", "qwen2moe", "qwen3moe")
# GGUF architecture -> the HF family llmlab records in ``ModelConfig.arch`` (llama with experts: mixtral).
_FAMILY = {"qwen3": "qwen3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "llama": "mixtral"}
_BLOCK_NAMES = {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_SOFTMAX_GATING = 1  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX


def gguf_extra_fields(arch: str, get: Callable[..., Any], names: set[str], source: str) -> dict[str, Any]:
    """ModelConfig fields for QK-norm / MoE GGUFs (``get(key, default)`` reads ``{arch}.key``)."""
    fields: dict[str, Any] = {}
    if arch in ("qwen3", "qwen3moe"):
        fields.update(qk_norm=True, arch=_FAMILY[arch])
    n_experts = int(get("expert_count", 0) or 0)
    if arch in ("qwen2moe", "qwen3moe") and not n_experts:
        raise CheckpointError(f"{source}: GGUF metadata key '{arch}.expert_count' missing")
    if not n_experts:
        return fields
    if int(get("expert_gating_func", _SOFTMAX_GATING)) != _SOFTMAX_GATING:
        raise CheckpointError(
            f"{source}: GGUF '{arch}.expert_gating_func' other than softmax is not supported"
        )
    if "blk.0.ffn_gate_exps.weight" not in names:
        raise CheckpointError(
            f"{source}: tensor 'blk.0.ffn_gate_exps.weight' missing (per-expert tensors of old GGUFs are not "
            "supported; re-convert with a current llama.cpp)"
        )
    shared = int(get("expert_shared_feed_forward_length", 0) or 0)
    fields.update(
        ffn="moe",
        n_experts=n_experts,
        experts_top_k=int(get("expert_used_count")),
        moe_d_ff=int(get("expert_feed_forward_length", 0) or get("feed_forward_length")),
        shared_expert_d_ff=shared if "blk.0.ffn_gate_shexp.weight" in names else 0,
        norm_topk_prob=bool(get("expert_weights_norm", arch != "qwen2moe")),
        moe_router="softmax_topk",
        arch=_FAMILY[arch],
    )
    return fields


def gguf_extra_name(layer: str, base: str, suffix: str) -> str | None:
    """llmlab's name of a QK-norm / MoE block tensor, or None when ``base`` is none of them."""
    if base in _EXPERT_NAMES and suffix == "weight":
        return f"layers.{layer}.mlp.experts.{_EXPERT_NAMES[base]}"
    if base in _BLOCK_NAMES:
        return f"layers.{layer}.{_BLOCK_NAMES[base]}.{suffix}"
    return None


def gguf_extra_value(base: str, value: Tensor) -> Tensor:
    """The shared expert's gate is stored 1-D by llama.cpp; llmlab's is an ``nn.Linear(d, 1)``."""
    return value.reshape(1, -1) if base == "ffn_gate_inp_shexp" else value


__all__ = ["GGUF_EXTRA_ARCHS", "gguf_extra_fields", "gguf_extra_name", "gguf_extra_value"]
