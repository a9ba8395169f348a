"""AWQ-style activation-aware scaling (Lin et al. 2024).

A few input channels carry much larger activations than the rest; their weights matter most. Scaling
input channel ``j`` of the weight up by ``s_j`` before quantization (and the activation down by ``s_j``)
lowers the relative rounding error on exactly those weights. With ``s = mean|x|^alpha`` the search tries a
small grid of ``alpha`` in [0, 1] and keeps the one with the lowest output error of the quantized layers
on calibration inputs (``alpha = 0`` is plain round-to-nearest, so the search never does worse than it on
that data).

The ``1/s`` on the activation costs nothing at inference: it is folded into the op that produces the
input (the RMSNorm/LayerNorm weight before q/k/v and gate/up, ``up_proj`` rows before ``down_proj``,
``v_proj`` rows before ``o_proj`` when every query head has its own value head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def output_error(
    x: Tensor,
    weights: list[Tensor],
    scale: Tensor,
    qdq: Callable[[Tensor], Tensor],
    refs: list[Tensor] | None = None,
) -> float:
    """``sum_i ||x W_i^T - (x / s) Q(W_i * s)^T||^2`` (x: ``[n, K]`` calibration inputs).

    ``refs`` are the float outputs ``x W_i^T`` when already computed.
    """
    xs = x / scale
    refs = refs if refs is not None else [x @ w.T for w in weights]
    return sum(float(((xs @ qdq(w * scale).T) - ref).pow(2).sum()) for w, ref in zip(weights, refs))


def search_scale(
    x: Tensor,
    weights: list[Tensor],
    qdq: Callable[[Tensor], Tensor],
    grid: int = 20,
) -> tuple[Tensor, float, float]:
    """Best per-input-channel scale for linears sharing input ``x``.

    Returns ``(scale [K], error with it, error without scaling)``.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    weights = [w.detach().float() for w in weights]
    act = x.abs().mean(dim=0).clamp(min=1e-8)
    refs = [x @ w.T for w in weights]
    best = (torch.ones_like(act), float("inf"))
    baseline = float("nan")
    for i in range(grid):
        alpha = i / grid
        scale = act.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()  # keep scales centred around 1
        err = output_error(x, weights, scale, qdq, refs)
        if i == 0:
            baseline = err
        if err < best[1]:
            best = (scale, err)
    return best[0], best[1], baseline


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Linear], scale: Tensor) -> None:
    """Divide ``prev``'s output channels by ``scale`` and multiply the linears' input columns by it.

    ``prev`` is a norm (scale its ``weight``/``bias``) or a linear (scale its weight rows/bias), so the
    float function of the block is unchanged.
    """
    scale = scale.to(next(prev.parameters()).dtype)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(scale[:, None])
    else:
        prev.weight.div_(scale)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(scale)
    for lin in linears:
        lin.weight.mul_(scale[None, :].to(lin.weight.dtype))
