"""Knowledge distillation's loss as a pure function: forward KL to a teacher's softened distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """Per-position distillation loss ``[...]`` (logits ``[..., V]``; 0 where ``mask`` is False).

    With ``p = softmax(z_teacher / T)`` and ``q = softmax(z_student / T)``::

        loss = (1 - alpha) * T² * KL(p ‖ q)  +  alpha * CE(softmax(z_student), labels)
        KL(p ‖ q) = Σ_v p_v (log p_v - log q_v)

    Forward KL (teacher first) is the classic KD objective: it is the cross-entropy to the teacher's soft
    targets minus the teacher's entropy, so it is 0 exactly when the student matches the teacher. Its
    gradient in the student's logits is ``T (q - p)``; the ``T²`` factor keeps that gradient's scale
    independent of ``T`` (Hinton et al. 2015). The hard-label term is at ``T = 1`` and needs ``labels``
    (``-100`` = no label, contributes 0). All of it is computed in fp32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    s = student_logits.float() / temperature
    p = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    # KL = H(p, q) - H(p). entr(p) = -p log p is 0 at p = 0, so a teacher that rules tokens out (-inf logits,
    # e.g. top-k sparse targets) gives no NaN.
    cross = -(p * torch.log_softmax(s, dim=-1)).sum(-1)
    entropy = torch.special.entr(p).sum(-1)
    loss = (1.0 - alpha) * temperature**2 * (cross - entropy)
    if alpha > 0:
        if labels is None:
            raise ValueError("alpha > 0 mixes in the hard-label cross-entropy, which needs labels")
        ce = F.cross_entropy(
            student_logits.float().reshape(-1, student_logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).reshape(labels.shape)
        loss = loss + alpha * ce
    if mask is not None:
        loss = loss * mask.to(loss.dtype)
    return loss
