"""The one evaluation loop: the weighted mean of a loss function (and its metrics) over fixed batches.

Every stage measures held-out data the same way the Trainer trains on it: ``loss_fn(model, batch) ->
LossOutput(loss_sum, weight, metrics)`` summed over the batches, divided by the total weight. So the held-out
loss of a batch of 3 tokens counts 3/100 of one of 100 tokens, and a metric such as reward accuracy is
averaged over pairs, not over batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from llmlab.losses.lm import LossFn, causal_lm_loss
from llmlab.train.distributed import model_device, to_device


def evaluate_loss(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """``{"loss": sum(loss_sum) / sum(weight), metric: weight-averaged metric, ...}`` over ``batches``.

    Runs without gradients, on the model's device (each batch is moved there), in eval mode (the mode is
    restored after), and under autocast to ``autocast`` when given (bf16, as in training). ``loss`` is NaN
    when the batches hold no weight.
    """
    loss_fn = loss_fn or causal_lm_loss
    device = model_device(model)
    was = model.training
    model.eval()
    cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    total = weight = 0.0
    sums: dict[str, float] = {}
    with torch.no_grad(), cast:
        for batch in batches:
            out = loss_fn(model, to_device(batch, device))
            total += float(out.loss_sum)
            weight += float(out.weight)
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * float(out.weight)
    model.train(was)
    if weight <= 0:
        return {"loss": float("nan")}
    return {"loss": total / weight, **{k: v / weight for k, v in sums.items()}}


def make_eval_fn(
    batches: Callable[[], Iterable[dict[str, Any]]],
    loss_fn: LossFn | None = None,
    bytes_per_token: float | None = None,
) -> Callable[[nn.Module], dict[str, float]]:
    """A Trainer ``eval_fn``: :func:`evaluate_loss` over ``batches()`` as loss, perplexity and (when
    ``bytes_per_token`` is known) bits per byte = nats/token / ln 2 x tokens/byte."""

    def eval_fn(model: nn.Module) -> dict[str, float]:
        metrics = evaluate_loss(model, batches(), loss_fn)
        loss = metrics["loss"]
        metrics["ppl"] = math.exp(min(loss, 50.0))
        if bytes_per_token:
            metrics["bpb"] = loss / math.log(2) / bytes_per_token
        return metrics

    return eval_fn
