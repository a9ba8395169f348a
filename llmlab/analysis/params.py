"""Which parameters a stage moved: relative update norms per parameter group and layer, and update spectra.

``param_delta(before, after)[group][layer] = ||W_after - W_before||_F / ||W_before||_F``, with the tensors of
one group in one layer taken together (``sqrt(sum ||dW||^2) / sqrt(sum ||W||^2)``). Groups: embeddings (token
and position tables, an untied head), q, k, v, o, gate, up, down, norms, and lora (an adapter's own update
``scale * B @ A`` against the base weight it adapts). Layer ``"-"`` holds parameters outside the blocks.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor

GROUPS = ("embeddings", "q", "k", "v", "o", "gate", "up", "down", "norms", "lora")
ATTENTION_GROUPS = ("q", "k", "v", "o")
FFN_GROUPS = ("gate", "up", "down")
_PROJ = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}  # fmt: skip
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def group_of(name: str) -> str | None:
    """The group of a parameter name (``layers.3.self_attn.q_proj.weight`` -> ``q``), None for others."""
    if "lora_" in name:
        return "lora"
    if name.startswith(("embed_tokens", "embed_positions", "lm_head")):
        return "embeddings"
    if "norm" in name:
        return "norms"
    for proj, group in _PROJ.items():
        if f".{proj}." in f".{name}":
            return group
    return None


def layer_of(name: str) -> str:
    m = _LAYER.search(name)
    return m.group(1) if m else "-"


def effective_rank(singular_values: Tensor) -> float:
    """``exp(entropy(s / sum s))`` (Roy & Vetterli 2007): 1 for a rank-one update, the size for a flat spectrum."""
    s = singular_values.double().clamp(min=0)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(singular_values: Tensor, fraction: float = 0.9) -> int:
    """Fewest singular values holding ``fraction`` of the update's squared Frobenius norm."""
    energy = singular_values.double() ** 2
    if float(energy.sum()) <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / energy.sum()
    return int((cumulative < fraction).sum()) + 1


def param_delta(before: dict[str, Tensor], after: dict[str, Tensor]) -> dict[str, Any]:
    """Relative update norms per group and layer, each group's total, and the attention/FFN split.

    Returns ``{"param_delta": {group: {layer: rel}}, "group_total": {group: rel}, "update_share":
    {group: share of sum ||dW||^2}, "attention_share", "ffn_share", "moved_fraction"}``.
    """
    sq_delta: dict[str, dict[str, float]] = {}
    sq_base: dict[str, dict[str, float]] = {}
    changed = total = 0
    for name, w_after in after.items():
        group = group_of(name)
        if group is None or group == "lora" or name not in before:
            continue
        w0, w1 = before[name].float(), w_after.float()
        if w0.shape != w1.shape:
            continue
        d = w1 - w0
        layer = layer_of(name)
        sq_delta.setdefault(group, {}).setdefault(layer, 0.0)
        sq_base.setdefault(group, {}).setdefault(layer, 0.0)
        sq_delta[group][layer] += float((d * d).sum())
        sq_base[group][layer] += float((w0 * w0).sum())
        changed += int((d != 0).sum())
        total += d.numel()
    return _summarize(sq_delta, sq_base, changed / max(total, 1))


def _summarize(sq_delta: dict, sq_base: dict, moved_fraction: float) -> dict[str, Any]:
    rel = {g: {layer: math.sqrt(v / max(sq_base[g][layer], 1e-30)) for layer, v in sorted(
        layers.items(), key=lambda kv: (kv[0] == "-", int(kv[0]) if kv[0] != "-" else 0))}
        for g, layers in sq_delta.items()}  # fmt: skip
    totals = {
        g: math.sqrt(sum(sq_delta[g].values()) / max(sum(sq_base[g].values()), 1e-30)) for g in sq_delta
    }
    all_sq = sum(sum(v.values()) for v in sq_delta.values()) or 1e-30
    share = {g: sum(v.values()) / all_sq for g, v in sq_delta.items()}
    return {
        "param_delta": {g: rel[g] for g in GROUPS if g in rel},
        "group_total": {g: totals[g] for g in GROUPS if g in totals},
        "update_share": {g: share[g] for g in GROUPS if g in share},
        "attention_share": sum(share.get(g, 0.0) for g in ATTENTION_GROUPS),
        "ffn_share": sum(share.get(g, 0.0) for g in FFN_GROUPS),
        "moved_fraction": moved_fraction,
    }


def update_spectra(before: dict[str, Tensor], after: dict[str, Tensor], top: int = 32) -> dict[str, Any]:
    """Effective rank and leading singular values of every 2-D block weight's update ``after - before``."""
    out: dict[str, Any] = {}
    for name, w1 in after.items():
        group = group_of(name)
        if group not in (*ATTENTION_GROUPS, *FFN_GROUPS) or name not in before or w1.dim() != 2:
            continue
        d = (w1.float() - before[name].float()).double()
        if not bool(d.any()):
            continue
        s = torch.linalg.svdvals(d)
        out[name] = {"effective_rank": effective_rank(s), "rank90": energy_rank(s), "full_rank": min(d.shape),
                     "singular_values": [float(x) for x in s[:top]]}  # fmt: skip
    return out


def lora_delta(adapter_state: dict[str, Tensor], base: dict[str, Tensor], scale: float) -> dict[str, Any]:
    """The adapter's own updates ``scale * B @ A``: relative norm per layer (the ``lora`` group) and spectra.

    ``adapter_state`` uses llmlab names (``layers.0.self_attn.q_proj.lora_A.weight``); ``base`` the model's.
    """
    rel: dict[str, list[float]] = {}
    spectra: dict[str, Any] = {}
    for key, a in adapter_state.items():
        if ".lora_A." not in key:
            continue
        prefix = key.split(".lora_A.")[0]
        b = adapter_state.get(f"{prefix}.lora_B.weight")
        w = base.get(f"{prefix}.weight")
        if b is None or w is None:
            continue
        d = scale * (b.double() @ a.double())
        rel.setdefault(layer_of(prefix), []).append(float(d.norm() / w.double().norm().clamp(min=1e-30)))
        s = torch.linalg.svdvals(d)
        spectra[prefix] = {"effective_rank": effective_rank(s), "rank90": energy_rank(s),
                           "adapter_rank": a.shape[0], "singular_values": [float(x) for x in s[: a.shape[0]]]}  # fmt: skip
    per_layer = {layer: math.sqrt(sum(x * x for x in v) / len(v)) for layer, v in rel.items()}
    return {"per_layer": per_layer, "spectra": spectra}


def summary_line(delta: dict[str, Any]) -> str:
    """Which groups moved most (relative norm) and the attention vs FFN share of the update."""
    totals = delta["group_total"]
    if not totals:
        return "no comparable parameters"
    top = sorted(totals, key=totals.get, reverse=True)[:3]
    moved = ", ".join(f"{g} {totals[g]:.3g}" for g in top)
    return (
        f"moved most (relative ||dW||/||W||): {moved}; of the squared update, attention holds "
        f"{100 * delta['attention_share']:.0f}%, the FFN {100 * delta['ffn_share']:.0f}% and the embeddings "
        f"{100 * delta['update_share'].get('embeddings', 0.0):.0f}%; "
        f"{100 * delta['moved_fraction']:.1f}% of the weights changed"
    )
