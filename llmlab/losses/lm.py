"""The language-modelling loss and the loss contract every training stage shares.

A loss function is ``loss_fn(model, batch) -> LossOutput(loss_sum, weight, metrics)``: ``loss_sum`` is the SUM
of per-token (or per-example) losses of a micro-batch and ``weight`` how many tokens/examples it covers, so
the Trainer can divide by the total weight of a whole optimizer step (see :mod:`llmlab.train.trainer`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.losses.fused_ce import fused_linear_cross_entropy, logits_cross_entropy
from llmlab.losses.moe import router_losses
from llmlab.model.transformer import Transformer
from llmlab.train.distributed import unwrap


@dataclass
class LossOutput:
    """What a loss function returns for one micro-batch (see the module docstring)."""

    loss_sum: Tensor
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


LossFn = Callable[[nn.Module, dict[str, Tensor]], LossOutput]

MODEL_KWARGS = ("positions", "segment_ids", "attention_mask")


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
    """Next-token cross-entropy summed over ``labels != -100`` (labels are already shifted by the loader).

    For an llmlab Transformer with a plain output head (one process or DDP) the head matmul and the loss are
    fused and chunked (:mod:`llmlab.losses.fused_ce`). Otherwise (FSDP, an adapted or quantized head) full
    logits go through ``F.cross_entropy``; inside ``torch.compile``, which fuses the plain path itself, they go
    through :func:`~llmlab.losses.fused_ce.logits_cross_entropy`, whose backward inductor fuses into one pass.
    An MoE model's router losses (:func:`~llmlab.losses.moe.router_losses`) join the sum in training, and its
    expert-load metrics are reported.
    """
    kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
    labels = batch["labels"]
    weight = None if torch.compiler.is_compiling() else _plain_head_weight(model)
    if weight is not None:
        hidden = model(batch["input_ids"], return_hidden=True, **kwargs)
        loss_sum = fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1)
        )
    else:
        logits = model(batch["input_ids"], **kwargs)
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        if torch.compiler.is_compiling():
            loss_sum = logits_cross_entropy(flat_logits, flat_labels)
        else:
            loss_sum = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=-100, reduction="sum")
    n_tokens = float((labels != -100).sum())
    router_loss, metrics = router_losses(model, n_tokens)  # MoE models only: (None, {}) for a dense one
    if router_loss is not None:
        loss_sum = loss_sum + router_loss
    return LossOutput(loss_sum, n_tokens, metrics)


def _plain_head_weight(model: nn.Module) -> Tensor | None:
    """The output-head weight when ``model`` computes logits as ``hidden @ weight.T`` and nothing else."""
    inner = unwrap(model)
    if not isinstance(inner, Transformer) or hasattr(inner, "reshard"):  # FSDP2 modules have .reshard()
        return None
    head = inner.lm_head
    if head is None:
        weight = inner.embed_tokens.weight
    elif type(head) is nn.Linear and head.bias is None:
        weight = head.weight
    else:
        return None  # LoRA / quantized / biased heads keep their own forward
    if type(weight) is not nn.Parameter and type(weight) is not Tensor:  # DTensor or a quantized tensor
        return None
    return weight
