"""Alignment losses: paper formulas on hand-computed cases, and parity with TRL 1.16's own loss code.

TRL computes its DPO/IPO and KTO losses inside ``_compute_loss(model, inputs)``, which runs the model. We call
those methods unbound on a minimal stand-in ``self`` whose "model" returns fixed per-token log-probs, so TRL's
own arithmetic (summing under the completion mask, IPO's length averaging, KTO's clamped KL) is what we compare
against, not a re-derivation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llmlab import losses as L

trl = pytest.importorskip("trl")


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------- hand-computed


def test_bradley_terry_hand_values():
    out = L.bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert out.tolist() == pytest.approx([-math.log(sig(1.0)), math.log(2.0)], abs=1e-6)
    with_margin = L.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=torch.tensor([1.0]))
    assert with_margin.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_dpo_hand_values():
    # h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; beta=0.5 -> -log sig(1)
    args = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])]
    assert L.dpo_loss(*args, beta=0.5).item() == pytest.approx(-math.log(sig(1.0)), abs=1e-6)
    eps = 0.1
    want = -(1 - eps) * math.log(sig(1.0)) - eps * math.log(sig(-1.0))
    assert L.dpo_loss(*args, beta=0.5, label_smoothing=eps).item() == pytest.approx(want, abs=1e-6)
    # Equal log-ratios: the loss is log 2 whatever beta is.
    same = [torch.tensor([-1.0])] * 4
    assert L.dpo_loss(*same, beta=3.0).item() == pytest.approx(math.log(2), abs=1e-6)


def test_dpop_hand_values():
    # Chosen above its reference: no penalty, DPOP is DPO. h = 2, beta = 0.5 -> -log sig(1).
    args = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])]
    assert L.dpop_loss(*args, beta=0.5, lambda_=50.0).item() == pytest.approx(-math.log(sig(1.0)), abs=1e-6)
    # Chosen 0.5 below its reference while the rejected falls further: DPO sees h = -0.5 + 2 = 1.5 and is
    # content; DPOP subtracts lambda x 0.5 = 2.5, so beta x (1.5 - 2.5) = -0.5.
    fell = [torch.tensor([-2.5]), torch.tensor([-4.0]), torch.tensor([-2.0]), torch.tensor([-2.0])]
    assert L.dpo_loss(*fell, beta=0.5).item() == pytest.approx(-math.log(sig(0.75)), abs=1e-6)
    assert L.dpop_loss(*fell, beta=0.5, lambda_=5.0).item() == pytest.approx(-math.log(sig(-0.5)), abs=1e-6)
    # lambda 0 is plain DPO; the penalty's gradient pushes the chosen log-prob up.
    pc = torch.tensor([-2.5], requires_grad=True)
    L.dpop_loss(pc, *fell[1:], beta=0.5, lambda_=5.0).sum().backward()
    dpo_pc = torch.tensor([-2.5], requires_grad=True)
    L.dpo_loss(dpo_pc, *fell[1:], beta=0.5).sum().backward()
    assert pc.grad.item() < dpo_pc.grad.item() < 0
    assert L.dpop_loss(*fell, beta=0.5, lambda_=0.0).item() == pytest.approx(
        L.dpo_loss(*fell, beta=0.5).item()
    )


def test_ipo_hand_values():
    args = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])]
    # h = 2, tau = 0.25 -> (2 - 2)^2 = 0: IPO's optimum is a log-ratio gap of exactly 1/(2 tau).
    assert L.ipo_loss(*args, beta=0.25).item() == pytest.approx(0.0, abs=1e-9)
    assert L.ipo_loss(*args, beta=0.5).item() == pytest.approx((2 - 1) ** 2, abs=1e-6)


def test_simpo_orpo_kto_hand_values():
    assert L.simpo_loss(
        torch.tensor([-0.5]), torch.tensor([-1.0]), beta=2.0, gamma=0.5
    ).item() == pytest.approx(-math.log(sig(2.0 * 0.5 - 0.5)), abs=1e-6)
    pc, pr = -0.5, -1.5
    log_odds = (pc - math.log(1 - math.exp(pc))) - (pr - math.log(1 - math.exp(pr)))
    got = L.orpo_loss(torch.tensor([pc]), torch.tensor([pr]), beta=0.1).item()
    assert got == pytest.approx(-0.1 * math.log(sig(log_odds)), abs=1e-6)
    # KTO: r = [1, -1], z0 = 0.5, beta = 1, weights 1 / 2.
    losses = L.kto_loss(
        torch.tensor([-1.0, -3.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([True, False]),
        0.5,
        beta=1.0,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    assert losses.tolist() == pytest.approx([1 - sig(0.5), 2 * (1 - sig(1.5))], abs=1e-6)
    kl = L.kto_kl_estimate(torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -0.5]))
    assert kl.item() == 0.0  # negative KL estimate is clamped to 0


def test_log1mexp_stable():
    x = torch.tensor([-1e-6, -0.5, -5.0, -50.0], dtype=torch.float64)
    assert torch.allclose(L.log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)
    assert torch.isfinite(L.log1mexp(torch.tensor([-1e-30]))).all()


def test_token_logps_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    got = L.token_logps(logits, labels)
    want = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    want[0, :2] = 0
    assert torch.allclose(got, want, atol=1e-6)


# ----------------------------------------------------------------------------------------- PPO


def naive_gae(rewards, values, gamma, lam):
    """Textbook GAE on one unpadded trajectory."""
    T = len(rewards)
    adv = [0.0] * T
    last = 0.0
    for t in reversed(range(T)):
        nv = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + gamma * nv - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_matches_textbook_with_padding():
    r1, v1 = [0.1, -0.2, 1.0], [0.5, 0.4, 0.3]
    r2, v2 = [0.3, 0.7], [0.2, -0.1]
    rewards = torch.tensor([r1 + [0.0], r2 + [9.0, 9.0]])[:, :3]
    values = torch.tensor([v1, v2 + [7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx(naive_gae(r1, v1, 0.9, 0.8), abs=1e-6)
    assert adv[1, :2].tolist() == pytest.approx(naive_gae(r2, v2, 0.9, 0.8), abs=1e-6)
    assert adv[1, 2].item() == 0 and ret[1, 2].item() == 0
    assert ret[0].tolist() == pytest.approx([a + v for a, v in zip(adv[0].tolist(), v1)], abs=1e-6)
    # gamma = lam = 1: the advantage is the return-to-go minus the value.
    adv1, _ = L.gae(rewards[:1], values[:1], mask[:1], 1.0, 1.0)
    togo = [sum(r1[t:]) - v1[t] for t in range(3)]
    assert adv1[0].tolist() == pytest.approx(togo, abs=1e-6)


def test_kl_penalty_rewards_puts_score_on_last_token():
    lp = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.5], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = L.kl_penalty_rewards(torch.tensor([2.0, 3.0]), lp, ref, mask, beta=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -0.5], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.05 + 2.0], [-0.1, 3.0, 0.0]]))


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # d = 0.5
    assert L.kl_per_token(lp, ref, "k1").item() == pytest.approx(0.5)
    assert L.kl_per_token(lp, ref, "k2").item() == pytest.approx(0.125)
    assert L.kl_per_token(lp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    # k1 and k3 are unbiased: average over samples of p of log p/q approaches KL(p||q).
    g = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    exact = (p * (p / q).log()).sum().item()
    for est in ("k1", "k3"):
        assert L.kl_per_token(p.log()[x], q.log()[x], est).mean().item() == pytest.approx(exact, abs=5e-3)
    with pytest.raises(ValueError):
        L.kl_per_token(lp, ref, "k9")


def test_ppo_policy_and_value_clipping():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = L.ppo_policy_loss(new, old, adv, clip_eps=0.2)
    # A>0 caps the ratio at 1.2; A<0 floors it at 0.8; inside the band the plain surrogate applies.
    assert loss.tolist() == pytest.approx([-1.2, -0.5, 1.1, 0.8], abs=1e-6)
    assert clipped.tolist() == [True, False, False, True]
    v, vo, R = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0])
    vl, vclip = L.ppo_value_loss(v, vo, R, clip_range=0.2)
    # row 0: max((1-0)^2, (0.2-0)^2)=1; row 1: max((0-1)^2, (0-1)^2)=1
    assert vl.tolist() == pytest.approx([0.5, 0.5])
    v2 = torch.tensor([0.5])
    vl2, _ = L.ppo_value_loss(v2, torch.tensor([0.0]), torch.tensor([1.0]), clip_range=0.2)
    assert vl2.item() == pytest.approx(0.5 * 0.8**2)  # the clipped value (0.2) is further from R


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = L.whiten(x, mask)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)
    assert w[0, 3].item() == 0
    assert L.whiten(x, mask, shift_mean=False)[0, :3].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-5)


# ---------------------------------------------------------------------------------------- GRPO


def test_grpo_advantages_and_loss():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = L.grpo_advantages(r, group_size=4)
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std().item()
    assert adv[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2, abs=1e-5)
    assert adv[4:].tolist() == [0.0] * 4  # zero-variance group: no signal
    with pytest.raises(ValueError):
        L.grpo_advantages(r[:7], group_size=4)
    lp = torch.log(torch.tensor([[1.5, 0.9]]))
    old = torch.zeros(1, 2)
    ref = torch.zeros(1, 2)
    loss, kl, clipped = L.grpo_loss(lp, old, ref, torch.tensor([2.0]), clip_eps=0.2, beta=0.1)
    k3 = [1 / 1.5 - math.log(1 / 1.5) - 1, 1 / 0.9 - math.log(1 / 0.9) - 1]
    assert kl[0].tolist() == pytest.approx(k3, abs=1e-6)
    assert loss[0].tolist() == pytest.approx([-1.2 * 2 + 0.1 * k3[0], -0.9 * 2 + 0.1 * k3[1]], abs=1e-6)
    assert clipped[0].tolist() == [True, False]


@pytest.mark.parametrize("loss_type", L.GRPO_LOSS_TYPES)
def test_grpo_matches_trl_compute_loss(loss_type):
    """TRL's GRPOTrainer._compute_loss (k3 KL, two-sided clip, each aggregation rule) on the same tensors."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    g = torch.Generator().manual_seed(1)
    B, T = 4, 6
    lp = -torch.rand(B, T, generator=g) * 2
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    ref = lp + 0.3 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    adv = torch.randn(B, generator=g)
    ours, _, _ = L.grpo_loss(lp, old, ref, adv, clip_eps=0.2, beta=0.04)
    loss_sum, weight = L.grpo_aggregate(ours, mask, loss_type, max_completion_length=T)
    trl_loss = _trl_grpo(GRPOTrainer, lp, old, ref, adv, mask, loss_type)
    assert (loss_sum / weight).item() == pytest.approx(trl_loss, abs=1e-6)
    by_hand = {  # the three rules written out, on the same per-token losses
        "grpo": ((ours * mask).sum(1) / mask.sum(1)).mean(),
        "dapo": (ours * mask).sum() / mask.sum(),
        "dr_grpo": (ours * mask).sum() / (B * T),
    }[loss_type]
    assert (loss_sum / weight).item() == pytest.approx(by_hand.item(), abs=1e-6)
    if loss_type != "grpo":  # the rules really differ on ragged completions
        grpo_sum, grpo_weight = L.grpo_aggregate(ours, mask, "grpo")
        assert abs((grpo_sum / grpo_weight).item() - (loss_sum / weight).item()) > 1e-3
    with pytest.raises(ValueError, match="loss_type"):
        L.grpo_aggregate(ours, mask, "bnpo-typo")


def test_grpo_config_rejects_unknown_loss_type():
    from llmlab.errors import ConfigError
    from llmlab.recipes.grpo import GRPOConfig

    with pytest.raises(ConfigError, match="loss_type"):
        GRPOConfig(loss_type="ppo").validate()


def _trl_grpo(cls, lp, old, ref, adv, mask, loss_type: str = "grpo") -> float:
    """Call GRPOTrainer._compute_loss unbound; the stand-in's log-prob hook returns the fixed ``lp``."""
    B, T = lp.shape
    stand_in = _stand_in(
        beta=0.04,
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type=loss_type,
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        off_policy_mask_threshold=None,
        max_completion_length=T,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
    )
    inputs = {
        "prompt_ids": torch.ones(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum().float(),  # dapo's normalizer: completion tokens in the batch
    }
    return float(cls._compute_loss(stand_in, None, inputs))


# ------------------------------------------------------------------------------- TRL parity (DPO)


def _fake_outputs(per_token_logps: torch.Tensor):
    zeros = torch.zeros_like(per_token_logps)
    return SimpleNamespace(
        log_probs=per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
    )


def _stand_in(**attrs):
    acc = SimpleNamespace(
        device=torch.device("cpu"),
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
        num_processes=1,
    )
    base = dict(
        model=SimpleNamespace(training=True),
        accelerator=acc,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    base.update(attrs)
    return SimpleNamespace(**base)


def _random_pair(seed: int, T: int = 9):
    """Per-token log-probs and completion masks for one (chosen, rejected) pair, prompt of 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2, T, dtype=torch.long)
    lens = torch.randint(1, T - 3, (2,), generator=g)
    for i in range(2):
        masks[i, 3 : 3 + lens[i]] = 1
    shift = masks[:, 1:]
    # float64 so the 1e-6 comparison tests the formula, not float32 summation order.
    policy = -torch.rand(2, T - 1, generator=g, dtype=torch.float64) * 3 * shift
    ref = -torch.rand(2, T - 1, generator=g, dtype=torch.float64) * 3 * shift
    return masks, policy, ref


def _trl_dpo(loss_type: str, beta: float, masks, policy, ref) -> float:
    from trl.trainer.dpo_trainer import DPOTrainer

    model = lambda **kw: _fake_outputs(policy)
    ref_sum = ref.sum(1)
    self = _stand_in(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
    )
    inputs = {
        "input_ids": torch.ones_like(masks),
        "attention_mask": torch.ones_like(masks),
        "completion_mask": masks,
        "ref_chosen_logps": ref_sum[:1],
        "ref_rejected_logps": ref_sum[1:],
    }
    return float(DPOTrainer._compute_loss(self, model, inputs, return_outputs=False))


@pytest.mark.parametrize("seed", range(5))
def test_dpo_and_ipo_match_trl(seed):
    masks, policy, ref = _random_pair(seed)
    ps, rs = policy.sum(1), ref.sum(1)
    for beta in (0.1, 0.5):
        ours = L.dpo_loss(ps[:1], ps[1:], rs[:1], rs[1:], beta=beta).item()
        assert ours == pytest.approx(_trl_dpo("sigmoid", beta, masks, policy, ref), abs=1e-6)
        pa, ra = ps / masks.sum(1), rs / masks.sum(1)  # TRL averages IPO over completion tokens
        ours_ipo = L.ipo_loss(pa[:1], pa[1:], ra[:1], ra[1:], beta=beta).item()
        assert ours_ipo == pytest.approx(_trl_dpo("ipo", beta, masks, policy, ref), abs=1e-6)


def test_cdpo_label_smoothing_matches_trl_cpo_sigmoid():
    """TRL 1.16's DPO 'sigmoid' has no label smoothing; its CPO 'sigmoid' loss is the cDPO formula on a given
    log-ratio gap, so we feed it the policy-minus-reference log-ratios."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-torch.rand(6, generator=g) * 20 for _ in range(4))
    for eps in (0.0, 0.1, 0.3):
        self = _stand_in(alpha=0.0, loss_type="sigmoid", beta=0.2, label_smoothing=eps)
        want, _, _ = CPOTrainer.cpo_loss(self, pc - rc, pr - rr)
        got = L.dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=eps)
        assert torch.allclose(got, want, atol=1e-6)


def test_simpo_matches_trl():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    g = torch.Generator().manual_seed(4)
    pc, pr = -torch.rand(8, generator=g) * 3, -torch.rand(8, generator=g) * 3
    for beta, gamma in ((2.0, 0.5), (2.5, 1.4)):
        self = _stand_in(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.0)
        want, _, _ = CPOTrainer.cpo_loss(self, pc, pr)
        assert torch.allclose(L.simpo_loss(pc, pr, beta=beta, gamma=gamma), want, atol=1e-6)


def test_orpo_matches_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(5)
    pc, pr = -torch.rand(8, generator=g) * 4, -torch.rand(8, generator=g) * 4
    pc[0] = -1e-4  # near-certain response: exercises log1mexp's small-|x| branch
    self = _stand_in(beta=0.25)
    trl_term, *_ = ORPOTrainer.odds_ratio_loss(self, pc, pr)
    # TRL returns +beta*log sigma(...) and subtracts it from the NLL; our loss term is its negation.
    assert torch.allclose(L.orpo_loss(pc, pr, beta=0.25), -trl_term, atol=1e-6)


def test_kto_matches_trl():
    from trl.trainer.kto_trainer import KTOTrainer

    g = torch.Generator().manual_seed(6)
    B, T = 6, 8
    masks = torch.zeros(B, T, dtype=torch.long)
    masks[:, 3:] = 1
    policy_tok = -torch.rand(B, T - 1, generator=g) * 2 * masks[:, 1:]
    labels = torch.tensor([True, False, True, True, False, False])
    ref = -torch.rand(B, generator=g) * 12
    for kl_shift in (-3.0, 2.0):  # a negative KL estimate (clamped to 0) and a positive one
        policy_kl = -torch.rand(B, generator=g) * 10
        ref_kl = policy_kl - kl_shift + 0.1 * torch.randn(B, generator=g)
        stand_in = _stand_in(
            precompute_ref_logps=True,
            calculate_KL=True,
            loss_type="kto",
            beta=0.3,
            desirable_weight=1.0,
            undesirable_weight=1.7,
            _compute_kl_logps=lambda model, batch, kl=policy_kl: kl,
        )
        batch = {
            "input_ids": torch.ones_like(masks),
            "attention_mask": torch.ones_like(masks),
            "completion_mask": masks,
            "label": labels,
            "ref_logps": ref,
            "ref_KL_logps": ref_kl,
        }
        want = KTOTrainer._compute_loss(stand_in, lambda **kw: _fake_outputs(policy_tok), batch, False)
        z0 = L.kto_kl_estimate(policy_kl, ref_kl)
        got = L.kto_loss(
            policy_tok.sum(1), ref, labels, z0, beta=0.3, desirable_weight=1.0, undesirable_weight=1.7
        )
        assert got.mean().item() == pytest.approx(float(want), abs=1e-6)
        assert stand_in._metrics["train"]["kl"][-1] == pytest.approx(z0.item(), abs=1e-6)


def test_bradley_terry_matches_trl_reward_trainer():
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(7)
    rc, rr, m = torch.randn(5, generator=g), torch.randn(5, generator=g), torch.rand(5, generator=g)
    logits = torch.cat([rc, rr]).unsqueeze(-1)
    model = lambda **kw: SimpleNamespace(logits=logits)
    self = _stand_in(args=SimpleNamespace(center_rewards_coefficient=None))
    for inputs, margin in (({}, None), ({"margin": m}, m)):
        inputs = {"attention_mask": torch.ones(10, 3), **inputs}
        want = RewardTrainer.compute_loss(self, model, inputs)
        assert L.bradley_terry_loss(rc, rr, margin).mean().item() == pytest.approx(float(want), abs=1e-6)


def test_losses_are_differentiable_and_finite():
    x = torch.tensor([-5.0, -0.01], requires_grad=True)
    total = (
        L.dpo_loss(x, x.flip(0), x.detach(), x.detach()).sum()
        + L.orpo_loss(x, x.flip(0)).sum()
        + L.simpo_loss(x, x.flip(0)).sum()
        + L.ipo_loss(x, x.flip(0), x.detach(), x.detach()).sum()
    )
    total.backward()
    assert torch.isfinite(x.grad).all()
    assert F.logsigmoid(torch.tensor(0.0)).item() == pytest.approx(-math.log(2))
