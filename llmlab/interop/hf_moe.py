"""Hugging Face mixture-of-experts checkpoints, both ways: ``mixtral``, ``qwen2_moe``, ``qwen3_moe``.

Each is its dense sibling (mistral, qwen2, qwen3: attention, norms, RoPE handled by :mod:`llmlab.interop.hf`)
with every MLP replaced by :class:`~llmlab.model.moe.MoE`; this module maps the MoE part:

| HF key (config.json)                  | llmlab ``ModelConfig``                                    |
|---------------------------------------|-----------------------------------------------------------|
| ``num_local_experts`` / ``num_experts`` | ``n_experts``                                           |
| ``num_experts_per_tok``               | ``experts_top_k``                                         |
| ``moe_intermediate_size`` (qwen)      | ``moe_d_ff`` (mixtral: ``intermediate_size``)             |
| ``shared_expert_intermediate_size``   | ``shared_expert_d_ff`` (qwen2_moe; its sigmoid gate too)  |
| ``norm_topk_prob`` (qwen)             | ``norm_topk_prob`` (mixtral always renormalizes)          |
| ``router_aux_loss_coef``              | ``aux_loss_weight``                                       |

Tensors: checkpoints store one tensor per expert (``mlp.experts.{e}.gate_proj.weight``; Mixtral:
``block_sparse_moe.experts.{e}.w1/w3/w2.weight`` = gate/up/down and ``block_sparse_moe.gate``), llmlab one
``[E, out, in]`` tensor per projection; loading stacks them, saving splits them (transformers' own in-memory
fused ``gate_up_proj`` layout is read too). Layers that are dense in an MoE model (``mlp_only_layers``,
``decoder_sparse_step`` > 1) have no llmlab equivalent (one ``ffn`` for all layers) and are refused.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import Tensor

from llmlab.errors import CheckpointError, ConfigError
from llmlab.model.config import ModelConfig

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
# The dense family whose attention/norm/RoPE layout each MoE family shares.
MOE_BASE_TYPES = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# llmlab projection -> Mixtral's per-expert name.
_MIXTRAL_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------ HF -> llmlab
def moe_config_from_hf(hf: dict[str, Any], model_type: str, base: ModelConfig, source: str) -> ModelConfig:
    """``base`` (the dense sibling's config, from :mod:`llmlab.interop.hf`) with the MoE fields of ``hf``."""
    n_layers = base.n_layers
    mlp_only = hf.get("mlp_only_layers") or []
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    if mlp_only or (step != 1 and n_layers >= step):
        key = "mlp_only_layers" if mlp_only else "decoder_sparse_step"
        raise CheckpointError(
            f"{source}: key '{key}' = {hf.get(key)!r}: dense layers inside an MoE model are not supported "
            "(llmlab uses one ffn for all layers)"
        )
    n_experts = hf.get("num_local_experts", hf.get("num_experts"))
    if n_experts is None:
        raise CheckpointError(f"{source}: missing key 'num_local_experts' (or 'num_experts')")
    fields: dict[str, Any] = dict(
        ffn="moe",
        n_experts=int(n_experts),
        experts_top_k=int(hf["num_experts_per_tok"]),
        moe_router="softmax_topk",
        aux_loss_weight=float(hf.get("router_aux_loss_coef", base.aux_loss_weight)),
        arch=model_type,
    )
    if model_type == "mixtral":
        fields.update(moe_d_ff=int(hf["intermediate_size"]), norm_topk_prob=True)
    else:
        fields.update(
            moe_d_ff=int(hf["moe_intermediate_size"]), norm_topk_prob=bool(hf.get("norm_topk_prob", False))
        )
    if model_type == "qwen2_moe":
        qkv_bias = bool(hf.get("qkv_bias", True))  # transformers 4.x always had q/k/v biases
        fields.update(shared_expert_d_ff=int(hf["shared_expert_intermediate_size"]), qkv_bias=qkv_bias)
    if model_type == "qwen3_moe":  # one window for every layer when use_sliding_window (no layer_types)
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        fields.update(sliding_window=int(window) if window else None)
    return dataclasses.replace(base, **fields)


_EXPERT_KEY = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")


def moe_state_from_hf(state: dict[str, Tensor], cfg: ModelConfig, source: str) -> dict[str, Tensor]:
    """Stack per-expert tensors (names already without the ``model.`` prefix) into llmlab's ``[E, ...]``."""
    back = {v: k for k, v in _MIXTRAL_NAMES.items()}
    experts: dict[tuple[int, str], dict[int, Tensor]] = {}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _EXPERT_KEY.fullmatch(key)
        if match:
            layer, expert, proj = int(match.group(1)), int(match.group(2)), match.group(3)
            experts.setdefault((layer, back.get(proj, proj)), {})[expert] = value
        elif key.endswith("mlp.experts.gate_up_proj"):  # transformers 5's fused in-memory layout
            gate, up = value.chunk(2, dim=1)
            prefix = key.removesuffix("gate_up_proj")
            out[prefix + "gate_proj"], out[prefix + "up_proj"] = gate.contiguous(), up.contiguous()
        else:
            out[key.replace(".block_sparse_moe.", ".mlp.")] = value
    for (layer, proj), per_expert in experts.items():
        missing = sorted(set(range(cfg.n_experts)) - set(per_expert))
        if missing or proj not in _PROJECTIONS:
            what = f"expert {missing[0]}" if missing else f"projection {proj!r}"
            raise CheckpointError(f"{source}: layer {layer}: MoE {what} missing or unexpected")
        out[f"layers.{layer}.mlp.experts.{proj}"] = torch.stack([per_expert[e] for e in range(cfg.n_experts)])
    return out


# ------------------------------------------------------------------------------------------ llmlab -> HF
def moe_model_type(cfg: ModelConfig) -> str:
    """The HF MoE family that represents ``cfg`` exactly, or a ConfigError naming what does not fit."""

    def need(cond: bool, what: str, family: str) -> None:
        if not cond:
            raise ConfigError(f"model config: cannot export to HF '{family}': {what}")

    normalized = cfg.norm_topk_prob or cfg.moe_router == "topk_softmax"
    if cfg.qk_norm:
        fam = "qwen3_moe"
        need(cfg.shared_expert_d_ff == 0, "has no shared expert (qwen2_moe has; it has no qk_norm)", fam)
        need(cfg.qkv_bias == cfg.out_bias, "attention_bias covers q/k/v and o together", fam)
        return fam
    if cfg.shared_expert_d_ff > 0:
        need(not cfg.out_bias, "has no o_proj bias", "qwen2_moe")
        return "qwen2_moe"
    fam = "mixtral"
    need(not (cfg.qkv_bias or cfg.out_bias), "has no attention biases", fam)
    need(normalized, "always renormalizes the top-k weights (norm_topk_prob=false needs a qwen family)", fam)
    return fam


def moe_config_to_hf(cfg: ModelConfig, model_type: str, out: dict[str, Any]) -> dict[str, Any]:
    """The dense sibling's HF config dict ``out`` turned into ``model_type``'s."""
    out = dict(out, model_type=model_type, architectures=[_ARCHITECTURES[model_type]])
    out.update(num_experts_per_tok=cfg.experts_top_k, router_aux_loss_coef=cfg.aux_loss_weight)
    normalized = cfg.norm_topk_prob or cfg.moe_router == "topk_softmax"
    if model_type == "mixtral":
        out.update(num_local_experts=cfg.n_experts, intermediate_size=cfg.expert_dim, router_jitter_noise=0.0)
        return out
    out.update(
        num_experts=cfg.n_experts,
        moe_intermediate_size=cfg.expert_dim,
        norm_topk_prob=normalized,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    if model_type == "qwen2_moe":
        out.update(shared_expert_intermediate_size=cfg.shared_expert_d_ff, qkv_bias=cfg.qkv_bias)
    return out


def moe_state_to_hf(state: dict[str, Tensor], model_type: str) -> dict[str, Tensor]:
    """Split llmlab's ``[E, ...]`` expert tensors into ``model_type``'s per-expert names (no prefix yet)."""
    mixtral = model_type == "mixtral"
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        layer_prefix, sep, proj = key.rpartition(".mlp.experts.")
        if not sep:
            router = mixtral and ".mlp.gate." in key  # Mixtral's router lives in block_sparse_moe
            out[key.replace(".mlp.", ".block_sparse_moe.") if router else key] = value
            continue
        for e in range(value.shape[0]):
            if mixtral:
                name = f"{layer_prefix}.block_sparse_moe.experts.{e}.{_MIXTRAL_NAMES[proj]}.weight"
            else:
                name = f"{layer_prefix}.mlp.experts.{e}.{proj}.weight"
            out[name] = value[e].contiguous()
    return out


__all__ = [
    "MOE_BASE_TYPES",
    "MOE_MODEL_TYPES",
    "moe_config_from_hf",
    "moe_config_to_hf",
    "moe_model_type",
    "moe_state_from_hf",
    "moe_state_to_hf",
]
