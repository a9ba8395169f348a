"""RL losses as pure functions on per-token tensors ``[B, T]`` with a response mask: PPO's KL-shaped rewards,
GAE, clipped policy/value losses and entropy; GRPO's group advantages, objective and aggregation rules.

They return per-token terms, so the caller sums them under the mask and hands the shared trainer a
``(loss_sum, weight)`` pair. ``π`` is the policy, ``π_ref`` the frozen reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ------------------------------------------------------------------------------------------------ PPO


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of ``KL(π ‖ π_ref)`` from samples of ``π`` (Schulman's k1/k2/k3).

    With ``d = log π − log π_ref``: k1 ``= d`` (unbiased, can be negative), k2 ``= d²/2`` (low variance),
    k3 ``= exp(−d) − 1 + d`` (unbiased and always ≥ 0; DeepSeekMath's GRPO uses it).
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2, k3)")


def kl_penalty_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    beta: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards ``r_t = −β·KL_t`` plus the sequence score on the last response token.

    This is the InstructGPT/Ziegler et al. shaping: the reward model scores the whole response, and every
    token pays for drifting from the reference. Returns ``(rewards [B, T], kl [B, T])``, both 0 off-mask.
    """
    mask = mask.to(logprobs.dtype)
    kl = kl_per_token(logprobs, ref_logprobs, estimator) * mask
    rewards = -beta * kl
    # The score goes on each row's last real token (responses end at different positions).
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()
    last &= last.cumsum(-1) == 1
    rewards = rewards + last.to(rewards.dtype) * scores.unsqueeze(-1).to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over the masked response tokens.

    ``δ_t = r_t + γ·V_{t+1} − V_t``, ``A_t = δ_t + γλ·A_{t+1}``; the value after a row's last token is 0
    (the episode ends). Returns ``(advantages, returns = A + V)``, 0 off-mask. Assumes each row's mask is one
    contiguous block (a response), which is how rollouts are laid out.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[-1]
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[..., 0])
    next_value = torch.zeros_like(values[..., 0])
    for t in reversed(range(T)):
        m = mask[..., t]
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        a = delta + gamma * lam * next_adv
        adv[..., t] = a * m
        # Off-mask positions pass the running values through unchanged (they sit after the response).
        next_adv = torch.where(m.bool(), a, next_adv)
        next_value = torch.where(m.bool(), values[..., t], next_value)
    return adv, (adv + values) * mask


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate per token: ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`` with ``ρ = π/π_old``.

    Returns ``(loss [B, T], clipped [B, T] bool)``; ``clipped`` marks tokens where the clip was active
    (for the clip-fraction metric).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_range: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped value loss per token: ``½·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²)``.

    Returns ``(loss [B, T], clipped [B, T] bool)``.
    """
    v_clip = old_values + (values - old_values).clamp(-clip_range, clip_range)
    a, b = (values - returns) ** 2, (v_clip - returns) ** 2
    return 0.5 * torch.maximum(a, b), b > a


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy ``−Σ p log p`` of the softmax over the last dim."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------------------------- GRPO


def grpo_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Group-normalized advantages (DeepSeekMath's outcome supervision): ``A_i = (r_i − mean_g) / (std_g + ε)``.

    ``rewards [N·G]`` are laid out group by group (the G samples of prompt 0, then prompt 1, ...). ``std``
    is the unbiased sample std, as in TRL. A group whose samples all score the same gets advantage 0: it
    carries no learning signal. ``scale=False`` gives Dr. GRPO's mean-only centring.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not a multiple of the group size {group_size}")
    g = rewards.view(-1, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def grpo_aggregate(
    per_token_loss: Tensor, mask: Tensor, loss_type: str = "grpo", max_completion_length: int | None = None
) -> tuple[Tensor, float]:
    """How per-token GRPO losses ``[B, T]`` (``mask`` 1 on completion tokens) become one number, as
    ``(loss_sum, weight)``: the trainer divides the sum of ``loss_sum`` over all micro-batches and ranks by
    the sum of ``weight``, so each rule holds over the whole rollout batch.

    - ``grpo`` (DeepSeekMath): mean over each completion's tokens, then over completions. Every completion
      weighs the same, so a token of a long one weighs less (the length bias Dr. GRPO points out).
    - ``dapo`` (Yu et al. 2025, TRL's ``dapo``): sum over all completion tokens / their number: every
      token weighs the same.
    - ``dr_grpo`` (Liu et al. 2025): sum over all completion tokens / (completions x
      ``max_completion_length``): a constant normalizer, so no length bias.
    """
    masked = (per_token_loss * mask).sum(-1)
    n = per_token_loss.shape[0]
    if loss_type == "grpo":
        return (masked / mask.sum(-1).clamp(min=1)).sum(), float(n)
    if loss_type == "dapo":
        return masked.sum(), float(mask.sum())
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        return masked.sum() / max_completion_length, float(n)
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {', '.join(GRPO_LOSS_TYPES)}")


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.04,
) -> tuple[Tensor, Tensor, Tensor]:
    """GRPO per-token objective (Shao et al. 2024, eq. 3), negated to a loss:

    ``L_t = −[min(ρ_t·A, clip(ρ_t, 1−ε, 1+ε)·A) − β·KL_t]`` with ``ρ_t = π/π_old``, the sequence advantage
    ``A`` broadcast over its tokens, and ``KL_t = π_ref/π − log(π_ref/π) − 1`` (the k3 estimator).

    Returns ``(loss [B, T], kl [B, T], clipped [B, T] bool)``; the caller averages under the response mask.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages.unsqueeze(-1)
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    loss = -torch.minimum(unclipped, clipped)
    if ref_logprobs is not None and beta:
        kl = kl_per_token(logprobs, ref_logprobs, "k3")
        loss = loss + beta * kl
    else:
        kl = torch.zeros_like(loss)
    return loss, kl, clipped < unclipped
