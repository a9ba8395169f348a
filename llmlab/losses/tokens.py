"""Per-token pieces the preference and RL losses share: label log-probs, masked means, whitening."""

from __future__ import annotations

import torch
from torch import Tensor


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``log softmax(logits)[label]`` per position ``[B, T]``; 0 where ``labels == ignore_index``.

    Computed as ``logit[label] − logsumexp(logits)`` so the full ``[B, T, V]`` log-softmax is never stored.
    """
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    logits = logits.float()
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    out = picked - torch.logsumexp(logits, dim=-1)
    return out * mask


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x − mean) / sqrt(var + eps)`` over the masked entries (mean added back if not ``shift_mean``).

    Used for PPO rewards and advantages: a fixed scale keeps the clipped objective's step size comparable
    across batches whatever the reward model's scale.
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask
