"""Router losses and load statistics of mixture-of-experts layers (:mod:`llmlab.model.moe`).

For one MoE layer over N tokens, E experts, top-k routing, router logits ``z [N, E]`` and ``p = softmax(z)``:

- **load-balancing loss** (Switch Transformer eq. 4, Mixtral's ``router_aux_loss``):
  ``L_aux = E * sum_e f_e * P_e`` with ``f_e`` = the fraction of the N*k assignments that chose expert e
  and ``P_e = mean_t p_{t,e}`` the mean router probability of e. ``f`` is not differentiable; the gradient
  flows through ``P`` and pushes probability away from overloaded experts. It is 1 when routing is uniform
  and E/k when every token picks the same k experts. (transformers' ``load_balancing_loss_func`` counts f
  per token instead of per assignment, which is k times this, and pools the layers before the product.)
- **router z-loss** (ST-MoE, Zoph et al. 2022): ``L_z = mean_t (logsumexp_e z_{t,e})^2``; keeps the router
  logits small, so the softmax stays out of its saturated, round-off-prone range.

Both are averaged over the model's MoE layers. :func:`router_losses` is the hook the LM loss calls: in
training it returns ``(aux_loss_weight * L_aux + router_z_loss_weight * L_z) * n_tokens`` to add to a summed
loss (the Trainer divides every loss sum by its token count), and in both modes the metrics ``moe_aux``,
``moe_z``, ``moe_dropped`` (the fraction of assignments the capacity limit dropped), ``moe_load_max``
(each layer's busiest expert's share times E, averaged over layers: 1 is perfect balance) and
``moe_load_e{i}`` (expert i's share of the assignments, averaged over layers).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmlab.model.moe import MoE, RouterRecord
from llmlab.train.distributed import unwrap


def expert_fractions(expert_idx: Tensor, n_experts: int) -> Tensor:
    """``f [E]``: the share of the assignments ``expert_idx [N, k]`` that went to each expert (sums to 1)."""
    counts = torch.bincount(expert_idx.reshape(-1), minlength=n_experts).float()
    return counts / max(expert_idx.numel(), 1)


def load_balancing_loss(logits: Tensor, expert_idx: Tensor) -> Tensor:
    """``L_aux = E * sum_e f_e * P_e`` (see the module docstring); ``logits [N, E]``, ``expert_idx [N, k]``."""
    n_experts = logits.shape[-1]
    f = expert_fractions(expert_idx, n_experts)
    mean_prob = torch.softmax(logits.float(), dim=-1).mean(dim=0)
    return n_experts * torch.sum(f * mean_prob)


def router_z_loss(logits: Tensor) -> Tensor:
    """``L_z = mean_t (logsumexp_e z_{t,e})^2`` over router logits ``[N, E]``."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers of ``model`` (empty for a dense model, found without walking its modules)."""
    inner = unwrap(model)
    cfg = getattr(inner, "cfg", None)
    if getattr(cfg, "ffn", None) != "moe":
        return []
    return [m for m in inner.modules() if isinstance(m, MoE)]


def router_records(model: nn.Module) -> list[RouterRecord]:
    """Each MoE layer's record of its last forward."""
    return [m.record for m in moe_layers(model) if m.record is not None]


def expert_load(model: nn.Module) -> Tensor:
    """``[layers, E]``: each layer's share of assignments per expert in the last forward."""
    records = router_records(model)
    if not records:
        return torch.zeros(0, 0)
    return torch.stack([expert_fractions(r.expert_idx, r.logits.shape[-1]) for r in records])


def router_losses(model: nn.Module, n_tokens: float) -> tuple[Tensor | None, dict[str, Tensor]]:
    """``(loss to add to a summed loss or None, metrics)`` after a forward of ``model`` over ``n_tokens``.

    None (and no metrics) for a dense model; None in eval mode, where only the metrics are reported, so a
    held-out loss stays pure cross-entropy.
    """
    records = router_records(model)
    if not records:
        return None, {}
    inner = unwrap(model)
    aux = torch.stack([load_balancing_loss(r.logits, r.expert_idx) for r in records]).mean()
    z = torch.stack([router_z_loss(r.logits) for r in records]).mean()
    per_layer = torch.stack([expert_fractions(r.expert_idx, r.logits.shape[-1]) for r in records])
    load = per_layer.mean(0)
    metrics = {
        "moe_aux": aux.detach(),
        "moe_z": z.detach(),
        "moe_dropped": torch.stack([r.dropped for r in records]).mean().detach(),
        # Per layer, then averaged: a layer-averaged load would hide layers collapsed onto different experts.
        "moe_load_max": per_layer.max(dim=1).values.mean() * load.numel(),
        **{f"moe_load_e{i}": v for i, v in enumerate(load)},
    }
    if not inner.training:
        return None, metrics
    cfg = inner.cfg
    extra = (cfg.aux_loss_weight * aux + cfg.router_z_loss_weight * z) * n_tokens
    return extra, metrics


__all__ = [
    "expert_fractions",
    "expert_load",
    "load_balancing_loss",
    "moe_layers",
    "router_losses",
    "router_records",
    "router_z_loss",
]
