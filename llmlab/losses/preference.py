"""Preference losses as pure functions on tensors: Bradley-Terry (reward models), DPO/cDPO, DPO-Positive,
IPO, SimPO, ORPO and KTO.

Offline preference objectives take per-sequence log-probabilities ``[B]`` (summed or averaged over the
response tokens, as each docstring says) and return per-example losses ``[B]``.

Notation: ``π`` is the policy, ``π_ref`` the frozen reference, ``y_w``/``y_l`` the chosen/rejected responses,
``σ`` the logistic function, ``h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

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


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Mean implicit rewards of chosen/rejected responses, reward accuracy (margin > 0) and mean margin."""
    margin = chosen_rewards - rejected_rewards
    return {
        "rewards_chosen": float(chosen_rewards.mean()),
        "rewards_rejected": float(rejected_rewards.mean()),
        "reward_accuracy": float((margin > 0).float().mean()),
        "reward_margin": float(margin.mean()),
    }


# ------------------------------------------------------------------- objectives, each with its properties
@dataclass
class PreferenceBatch:
    """Sequence log-probs of ``B`` examples: summed ``policy`` log-probs of the (chosen, rejected) responses
    and their token counts, the cached reference log-probs (None when reference-free). KTO (unpaired) reads
    ``chosen`` as the examples, ``rejected`` as their mismatched KL completions, and ``desirable``."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    desirable: Tensor | None = None


@dataclass(frozen=True)
class PreferenceOptions:
    """The objective-specific knobs (each objective reads the ones it needs)."""

    beta: float
    label_smoothing: float = 0.0
    dpop_lambda: float = 50.0
    simpo_gamma: float = 0.5
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0


@dataclass
class ObjectiveOutput:
    """Per-example losses ``[B]``, the implicit rewards of chosen/rejected responses for logging (None for
    KTO, which logs its own), and extra metrics."""

    losses: Tensor
    rewards_chosen: Tensor | None
    rewards_rejected: Tensor | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PreferenceObjective:
    """One offline preference objective: its name, whether it needs a reference model, its usual β, whether
    its data is unpaired (KTO), and ``compute(batch, options) -> ObjectiveOutput``."""

    name: str
    compute: Callable[[PreferenceBatch, PreferenceOptions], ObjectiveOutput]
    reference_free: bool = False
    default_beta: float = 0.1
    unpaired: bool = False


def _averaged(b: PreferenceBatch) -> tuple[Tensor, Tensor]:
    return b.chosen / b.chosen_tokens.clamp(min=1), b.rejected / b.rejected_tokens.clamp(min=1)


def _with_reference_rewards(b: PreferenceBatch, losses: Tensor, beta: float) -> ObjectiveOutput:
    rc, rr = (
        implicit_rewards(b.chosen, b.ref_chosen, beta),
        implicit_rewards(b.rejected, b.ref_rejected, beta),
    )
    return ObjectiveOutput(losses, rc, rr)


def _dpo(b: PreferenceBatch, o: PreferenceOptions) -> ObjectiveOutput:
    losses = dpo_loss(b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, o.beta, o.label_smoothing)
    return _with_reference_rewards(b, losses, o.beta)


def _dpop(b: PreferenceBatch, o: PreferenceOptions) -> ObjectiveOutput:
    losses = dpop_loss(b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, o.beta, o.dpop_lambda)
    return _with_reference_rewards(b, losses, o.beta)


def _ipo(b: PreferenceBatch, o: PreferenceOptions) -> ObjectiveOutput:
    nc, nr = b.chosen_tokens, b.rejected_tokens
    losses = ipo_loss(b.chosen / nc, b.rejected / nr, b.ref_chosen / nc, b.ref_rejected / nr, o.beta)
    return _with_reference_rewards(b, losses, o.beta)


def _simpo(b: PreferenceBatch, o: PreferenceOptions) -> ObjectiveOutput:
    ac, ar = _averaged(b)
    losses = simpo_loss(ac, ar, o.beta, o.simpo_gamma)
    return ObjectiveOutput(losses, (o.beta * ac).detach(), (o.beta * ar).detach())


def _orpo(b: PreferenceBatch, o: PreferenceOptions) -> ObjectiveOutput:
    ac, ar = _averaged(b)
    or_term = orpo_loss(ac, ar, o.beta)
    metrics = {"orpo_or": float(or_term.detach().mean()), "nll": float(-ac.detach().mean())}
    # ORPO's loss is the chosen response's length-averaged NLL plus the odds-ratio term.
    return ObjectiveOutput(-ac + or_term, (o.beta * ac).detach(), (o.beta * ar).detach(), metrics)


def _kto(b: PreferenceBatch, o: PreferenceOptions) -> ObjectiveOutput:
    z0 = kto_kl_estimate(b.rejected, b.ref_rejected)
    desirable = b.desirable
    losses = kto_loss(
        b.chosen, b.ref_chosen, desirable, z0, o.beta, o.kto_desirable_weight, o.kto_undesirable_weight
    )
    r = implicit_rewards(b.chosen, b.ref_chosen, o.beta)
    metrics = {"kl": float(z0)}
    if desirable.any():
        metrics["rewards_desirable"] = float(r[desirable].mean())
    if (~desirable).any():
        metrics["rewards_undesirable"] = float(r[~desirable].mean())
    return ObjectiveOutput(losses, None, None, metrics)


PREFERENCE_OBJECTIVES: dict[str, PreferenceObjective] = {
    o.name: o
    for o in (
        PreferenceObjective("dpo", _dpo),
        PreferenceObjective("dpop", _dpop),
        PreferenceObjective("ipo", _ipo),
        PreferenceObjective("kto", _kto, unpaired=True),
        PreferenceObjective("orpo", _orpo, reference_free=True),
        PreferenceObjective("simpo", _simpo, reference_free=True, default_beta=2.0),
    )
}
