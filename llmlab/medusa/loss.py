"""The Medusa training loss and its held-out scores, as pure functions of head states and labels."""

from __future__ import annotations

import torch
from torch import Tensor

from llmlab.losses.fused_ce import IGNORE_INDEX, fused_linear_cross_entropy


def medusa_loss(
    states: Tensor, weights: list[Tensor], labels: Tensor, decay: float = 0.8
) -> tuple[Tensor, list[Tensor]]:
    """Medusa-1's loss (Cai et al. 2024, eq. 1) over ``N`` positions and ``K`` heads::

        L = sum_k decay^(k-1) * sum_t CE(W_k s_{t,k}, x_{t+1+k})

    ``states [N, K, D]``: each head's residual-block output at position ``t``; ``weights``: the ``K``
    projections ``W_k [V, D]`` (the same shared LM head ``K`` times, or one copy per head); ``labels [N, K]``:
    ``x_{t+1+k}``, -100 where there is none (past the sequence, or a position not trained on). The decay
    (0.8 in the paper) weights the far heads down: their targets are harder and matter only when every nearer
    head was right. Returns the weighted sum and each head's plain CE sum (detached, for logging). The
    head and the cross-entropy are fused chunk by chunk (no ``[N, V]`` logits kept for backward).
    """
    total = states.new_zeros((), dtype=torch.float32)
    per_head = []
    for k, w in enumerate(weights):
        ce = fused_linear_cross_entropy(states[:, k], w, labels[:, k])
        total = total + (decay**k) * ce
        per_head.append(ce.detach())
    return total, per_head


def chain_scores(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Held-out scores of heads ``logits [N, K, V]`` against ``labels [N, K]`` (rows with a head-1 label).

    Returns ``(top1 [K], accepted [N])``: each head's top-1 accuracy over its labelled rows, and per row how
    many leading heads are right. When the labels are the base's own greedy tokens, ``1 + accepted`` is
    exactly what a greedy Medusa chain emits per verify step at that position (a draft is kept only while
    every draft before it was), so its mean is the expected acceptance length.
    """
    valid = labels != IGNORE_INDEX
    hit = (logits.argmax(-1) == labels) & valid
    top1 = hit.sum(0).float() / valid.sum(0).clamp(min=1).float()
    accepted = hit.int().cumprod(dim=1).sum(dim=1)
    return top1, accepted


def topk_hits(logits: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per head, how many labelled rows have their label among the head's ``k`` best tokens, and how many
    rows are labelled: ``(hits [K], counts [K])`` for ``logits [N, K, V]``, ``labels [N, K]`` (top-k
    accuracy = hits / counts; with a tree of width ``k`` at a head, what that head can contribute)."""
    valid = labels != IGNORE_INDEX
    top = logits.topk(k, dim=-1).indices
    hit = (top == labels.clamp(min=0).unsqueeze(-1)).any(-1) & valid
    return hit.sum(0), valid.sum(0)
