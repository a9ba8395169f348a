"""Training-stability losses: the output z-loss (PaLM) and the causal-LM loss with it.

The softmax is shift-invariant, so nothing in cross-entropy stops the output logits from drifting upwards
together; large logits make the bf16 log-sum-exp imprecise and, at high learning rates, feed loss spikes.
PaLM adds ``1e-4 * log(Z)^2`` to keep ``log Z`` near 0 (the logits then stay self-normalized).

Not to be confused with a MoE *router* z-loss (same formula on the router's logits, its own weight
``router_z_loss_weight``): this one is on the vocabulary logits and weighted by ``train.z_loss_weight``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.losses.lm import MODEL_KWARGS, LossOutput
from llmlab.losses.moe import router_losses


def z_loss(logits: Tensor, weight: float, mask: Tensor | None = None) -> Tensor:
    """Output z-loss, SUMMED over tokens (the Trainer divides by the token count)::

        L_z = w * sum_t log(Z_t)^2,   Z_t = sum_v exp(logit_{t,v})

    so ``L_z / N`` is PaLM's ``w * mean_t log(Z_t)^2``. ``logits [..., V]``; ``mask`` (same shape without
    ``V``) selects the tokens that count (default: all). Computed in fp32.
    """
    log_z = torch.logsumexp(logits.float(), dim=-1)
    sq = log_z.square()
    if mask is not None:
        sq = sq * mask.to(sq.dtype)
    return weight * sq.sum()


def causal_lm_z_loss(model: nn.Module, batch: dict[str, Tensor], z_loss_weight: float) -> LossOutput:
    """Next-token cross-entropy plus the output z-loss, both summed over ``labels != -100``::

        L = sum_t [ -log p(x_{t+1} | x_<=t) + w * log(Z_t)^2 ]

    Full logits are materialized (the fused head of :func:`~llmlab.losses.lm.causal_lm_loss` never exposes
    ``log Z``). Metrics: ``z_loss`` (per token, weighted) and ``log_z`` (mean ``log Z`` per token), so the
    drift the z-loss prevents can be watched.
    """
    kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
    labels = batch["labels"]
    logits = model(batch["input_ids"], **kwargs).float()
    valid = labels != -100
    flat = logits.reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="sum")
    z_sum = z_loss(logits, z_loss_weight, valid)
    count = max(float(valid.sum()), 1.0)
    with torch.no_grad():
        mean_log_z = (torch.logsumexp(logits, dim=-1) * valid).sum() / count
    metrics: dict[str, Any] = {"z_loss": z_sum.detach() / count, "log_z": mean_log_z}
    router_loss, router_metrics = router_losses(model, float(valid.sum()))  # MoE only; (None, {}) if dense
    loss_sum = ce + z_sum if router_loss is None else ce + z_sum + router_loss
    return LossOutput(loss_sum, float(valid.sum()), {**metrics, **router_metrics})
