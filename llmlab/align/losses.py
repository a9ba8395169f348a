"""Preference and RL losses as pure functions on tensors.

Offline preference objectives take per-sequence log-probabilities ``[B]`` (summed or averaged over the
response tokens, as each docstring says) and return per-example losses ``[B]``. The RL pieces (PPO, GRPO)
work on per-token tensors ``[B, T]`` with a response mask and return per-token terms, so the caller can sum
them under the mask and hand the shared trainer a ``(loss_sum, weight)`` pair.

Notation: ``π`` is the policy, ``π_ref`` the frozen reference, ``y_w``/``y_l`` the chosen/rejected responses,
``σ`` the logistic function, ``h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------- helpers


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


# ------------------------------------------------------------------------------------ reward model


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None
) -> Tensor:
    """Reward-model pairwise loss ``−log σ(r_w − r_l − m)`` per pair.

    ``margin`` (Llama-2's preference-strength margin) demands the chosen reward beat the rejected one by
    at least ``m`` before the loss flattens out.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


# ----------------------------------------------------------------------------- offline preference


def _logratio_gap(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> Tensor:
    """``h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l)``, the quantity DPO, DPOP and IPO act on."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7) with conservative-DPO label smoothing ε.

    ``L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)`` with ``h`` from summed response log-probs. ``ε = 0`` is plain
    DPO; ``ε > 0`` treats each label as flipped with probability ε.
    """
    h = _logratio_gap(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = -F.logsigmoid(beta * h)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * h)
    return loss


def dpop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    lambda_: float = 50.0,
) -> Tensor:
    """DPO-Positive (Pal et al. 2024, "Smaug", eq. 3), on summed response log-probs.

    ``L = −log σ(β·(h − λ·max(0, log π_ref(y_w) − log π(y_w))))`` with ``h`` DPO's log-ratio difference.
    When chosen and rejected differ in a few tokens (a digit of an answer), DPO can lower the chosen
    response's likelihood along with the rejected one's; the penalty is zero until the policy makes the
    chosen response less likely than the reference did, then grows with λ.
    """
    h = _logratio_gap(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    penalty = (ref_chosen_logps - policy_chosen_logps).clamp(min=0)
    return -F.logsigmoid(beta * (h - lambda_ * penalty))


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): ``L = (h − 1/(2τ))²`` with ``τ = beta``.

    The caller passes log-probs *averaged* over response tokens (as TRL does, confirmed with the IPO
    authors), so the squared loss does not grow with response length.
    """
    h = _logratio_gap(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> Tensor:
    """SimPO (Meng et al. 2024, eq. 6): ``L = −log σ(β·avg log π(y_w) − β·avg log π(y_l) − γ)``.

    Reference-free: the length-averaged log-prob is the implicit reward, ``γ`` a target margin.
    """
    return -F.logsigmoid(beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, stable at both ends (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_avg_logps: Tensor, policy_rejected_avg_logps: Tensor, beta: float = 0.1
) -> Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4–7): ``L_OR = −β·log σ(log odds(y_w) − log odds(y_l))``.

    ``odds(y) = P(y)/(1 − P(y))`` with ``log P(y)`` the length-averaged log-prob, so
    ``log odds = log P − log(1 − P)``. The SFT (NLL) term on the chosen response is added by the caller.
    """
    pc, pr = policy_chosen_avg_logps.float(), policy_rejected_avg_logps.float()
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    return -beta * F.logsigmoid(log_odds)


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point ``z0 = max(0, mean(log π(y'|x) − log π_ref(y'|x)))``, detached.

    ``y'`` are *mismatched* completions (another example's response for prompt ``x``), so the mean is a
    biased but cheap estimate of ``KL(π ‖ π_ref)`` for the batch; no gradient flows through it (as in TRL).
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 7) on unpaired examples, per example ``[B]``.

    With ``r = log π(y|x) − log π_ref(y|x)`` (summed log-probs) and ``z0`` from :func:`kto_kl_estimate`:

    - desirable ``y``:   ``λ_D · (1 − σ(β·(r − z0)))``
    - undesirable ``y``: ``λ_U · (1 − σ(β·(z0 − r)))``

    ``desirable`` is a bool ``[B]``. The loss is bounded in ``[0, λ]`` (a prospect-theory value function).
    """
    r = policy_logps - ref_logps
    desirable = desirable.bool()
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(desirable, good, bad)


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward ``β·(log π(y|x) − log π_ref(y|x))`` (detached, for logging)."""
    return (beta * (policy_logps - ref_logps)).detach()


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
