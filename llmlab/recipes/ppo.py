"""PPO for RLHF (Ziegler et al. 2019; InstructGPT): policy + value head, frozen reference, frozen reward.

Each step:

1. **Rollout**: sample one response per prompt from the live policy through the shared inference engine.
2. **Score**: the reward model (a :class:`~llmlab.align.reward_model.RewardModel` checkpoint, tokenizer checked
   against the policy's) scores each (prompt, response), or a programmatic reward (the verifier, or the
   deliberately length-biased ``proxy`` used by the reward-hacking demo).
3. **Shape**: per-token rewards ``−β·KL_t`` with the score on the last token
   (:func:`~llmlab.losses.kl_penalty_rewards`), optionally whitened; β fixed or adapted toward
   ``target_kl`` (Ziegler's proportional controller).
4. **Advantages**: GAE over the value head's estimates, whitened.
5. **Update**: ``ppo_epochs`` passes over shuffled minibatches, one ``Trainer.train_step`` each, on the clipped
   policy loss plus ``vf_coef`` × the clipped value loss.

The value head is a linear layer on the policy's final hidden state (a shared trunk, as in TRL's first PPO
trainer): cheaper on a CPU than a second network. **Overoptimization guard**: when the mean per-sequence KL to
the reference passes ``kl_stop``, the run restores the last policy whose KL was within bounds and stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmlab import losses as L
from llmlab.align import rollout as R
from llmlab.align.data import Encoded
from llmlab.align.reward_model import check_same_tokenizer, load_reward_model, score_encoded
from llmlab.errors import ConfigError
from llmlab.recipes.common import load_policy, prepare_policy, rl_train_config
from llmlab.recipes.rl_loop import RLAlgorithm, RLConfig, Rollout, reference_logps, run_rl
from llmlab.train.config import TrainConfig
from llmlab.train.distributed import model_device
from llmlab.train.logging import write_report

REWARDS = ("rm", "verifier", "proxy")


@dataclass
class PPOConfig(RLConfig):
    reward: str = (
        "rm"  # rm (reward_model checkpoint) | verifier (exact match + format) | proxy (length-biased)
    )
    reward_model: str | None = None
    eval_samples: int = 4  # sampled completions per held-out prompt for before/after_sampled_reward_score
    prompts_per_step: int = 16
    kl_coef: float = 0.05  # β
    adaptive_kl: bool = False
    target_kl: float = 2.0  # nats per response, for the adaptive controller
    kl_horizon: int = 100
    kl_stop: float | None = 20.0  # overoptimization guard (nats per response); None disables it
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.1
    detach_value: bool = False  # value loss trains the head only, not the shared trunk (see ActorCritic)
    ppo_epochs: int = 4
    minibatch: int = 8
    micro_batch: int = 8
    whiten_rewards: bool = False
    proxy_length_bonus: float = 0.05  # per response token, for reward=proxy
    train: TrainConfig = field(
        default_factory=lambda: rl_train_config(warmup_steps=0, max_steps=50, batch_size=8)
    )

    def validate(self) -> None:
        if self.reward not in REWARDS:
            raise ConfigError(f"config key 'reward' must be one of {list(REWARDS)}, got {self.reward!r}")
        if self.reward == "rm" and not self.reward_model:
            raise ConfigError("reward=rm needs config key 'reward_model' (a checkpoint from 'llmlab rm')")
        if self.kl_coef < 0 or self.target_kl <= 0:
            raise ConfigError("config keys 'kl_coef' >= 0 and 'target_kl' > 0 required")
        super().validate()
        for k in ("ppo_epochs", "minibatch", "kl_horizon"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"config key '{k}' must be positive, got {getattr(self, k)}")


PPO_PRESETS: dict[str, PPOConfig] = {
    # PPO of the tiny SFT model (pass model=... and reward_model=..., an `llmlab rm` checkpoint) on task-suite
    # prompts: 32 rollouts per step, the value loss on the head only, adaptive KL toward 2 nats, 60 steps,
    # ~2.5 CPU minutes (results: BENCHMARKS.md, "Preset run histories").
    "tiny-ppo": PPOConfig(
        reward="rm",
        source="tasks",
        n_train=2000,
        n_eval=180,
        prompts_per_step=32,
        max_new_tokens=20,
        kl_coef=0.05,
        adaptive_kl=True,
        target_kl=2.0,
        kl_stop=30.0,
        ppo_epochs=2,
        minibatch=8,
        micro_batch=16,
        vf_coef=1.0,
        detach_value=True,
        train=rl_train_config(lr=3e-5, min_lr=3e-5, warmup_steps=0, max_steps=60, batch_size=16),
    ),
}


class AdaptiveKLController:
    """Ziegler et al.'s controller: ``β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)``."""

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int = 1) -> float:
        err = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value


class ActorCritic(nn.Module):
    """The policy Transformer plus a scalar value head on its final hidden states.

    With ``detach_value`` the value loss trains only the head: the trunk is the policy's, and letting the value
    regression move it too was measured to drift the policy (mean KL 5-8 nats at vf_coef 0.5) without raising
    the reward, which then fell on held-out prompts.
    """

    def __init__(self, policy: nn.Module, detach_value: bool = False):
        super().__init__()
        self.policy = policy
        self.detach_value = detach_value
        self.value_head = nn.Linear(policy.cfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def cfg(self):
        return self.policy.cfg

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hidden = self.policy(input_ids, attention_mask=attention_mask, return_hidden=True)
        features = hidden.detach() if self.detach_value else hidden
        values = self.value_head(features.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return self.policy.logits(hidden), values


def ppo_loss_fn(clip_eps: float, vf_clip: float, vf_coef: float):
    """Token-level PPO loss: clipped policy loss + ``vf_coef`` × clipped value loss, summed over response
    tokens (weight = tokens)."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]):
        logits, values = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = (batch["labels"] != -100).to(values.dtype)
        lp = L.token_logps(logits, batch["labels"])
        pg, pg_clipped = L.ppo_policy_loss(lp, batch["old_logps"], batch["advantages"], clip_eps)
        vf, vf_clipped = L.ppo_value_loss(values, batch["old_values"], batch["returns"], vf_clip)
        loss = (pg + vf_coef * vf) * mask
        with torch.no_grad():
            ent = L.entropy_from_logits(logits)
            metrics = {
                "pg_loss": float(L.masked_mean(pg, mask)),
                "value_loss": float(L.masked_mean(vf, mask)),
                "clip_frac": float(L.masked_mean(pg_clipped.float(), mask)),
                "vf_clip_frac": float(L.masked_mean(vf_clipped.float(), mask)),
                "entropy": float(L.masked_mean(ent, mask)),
                "approx_kl": float(L.masked_mean(0.5 * (lp - batch["old_logps"]) ** 2, mask)),
            }
        return L.LossOutput(loss.sum(), float(mask.sum()), metrics)

    return loss_fn


def make_scorer(cfg: PPOConfig, tokenizer: Any, device: torch.device):
    """``score(problems, prompt_ids, outputs) -> Tensor [N]`` for the configured reward."""
    if cfg.reward == "rm":
        rm, rm_tok = load_reward_model(cfg.reward_model, device)
        check_same_tokenizer(tokenizer, rm_tok, f"reward model {cfg.reward_model}")
        rm.requires_grad_(False)

        def score(problems, prompts, outs) -> Tensor:
            encs = [Encoded(list(p), list(o.token_ids) or [tokenizer.pad_id]) for p, o in zip(prompts, outs)]
            return torch.tensor(score_encoded(rm, encs, tokenizer.pad_id))

        return score
    if cfg.reward == "verifier":

        def score(problems, prompts, outs) -> Tensor:
            return torch.tensor([R.verifier_reward(p, o.text)[0] for p, o in zip(problems, outs)])

        return score

    def proxy(problems, prompts, outs) -> Tensor:
        # A reward with a known bias: "the answer appears somewhere" (not strict exact match) plus a bonus
        # per generated token. Rambling that mentions many numbers games both terms.
        vals = []
        for p, o in zip(problems, outs):
            vals.append(float(p.answer.strip() in o.text) + cfg.proxy_length_bonus * len(o.token_ids))
        return torch.tensor(vals)

    return proxy


class PPOAdvantages:
    """PPO's advantage function for :func:`~llmlab.recipes.rl_loop.run_rl`: old log-probs and values under
    the current policy, reference log-probs, the KL-shaped per-token rewards, GAE and whitening. It owns the
    adaptive KL coefficient and the overoptimization guard: when the mean sequence KL passes ``kl_stop`` it
    restores the last policy within bounds and ends the run (``stopped`` then holds the step and the KL)."""

    def __init__(self, cfg: PPOConfig, ac: ActorCritic, ref: nn.Module | None):
        self.cfg, self.ac, self.ref = cfg, ac, ref
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.trainable = [p for p in ac.parameters() if p.requires_grad]
        self.good_state = [p.detach().clone() for p in self.trainable]
        self.stopped: dict[str, float] | None = None

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> bool:
        cfg, ac, batch = self.cfg, self.ac, rollout.batch
        scores = rollout.rewards.float().to(batch["input_ids"].device)
        mask = batch["labels"] != -100
        ac.eval()
        olds, vals = [], []
        width = batch["input_ids"].shape[1]
        for mb in R.split_batch(dict(batch), cfg.micro_batch):
            logits, v = ac(mb["input_ids"], attention_mask=mb["attention_mask"])
            olds.append(_pad_to(L.token_logps(logits, mb["labels"]), width))
            vals.append(_pad_to(v, width))
        ac.train()
        old_lp, values = torch.cat(olds), torch.cat(vals) * mask
        ref_lp = reference_logps(ac.policy, self.ref, batch, cfg.use_lora, cfg.micro_batch)
        beta = self.kl_ctl.value
        rewards, kl = L.kl_penalty_rewards(scores, old_lp, ref_lp, mask, beta)
        if cfg.whiten_rewards:
            rewards = L.whiten(rewards, mask, shift_mean=False)
        adv, returns = L.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        adv = L.whiten(adv, mask)
        seq_kl = float(kl.sum(-1).mean())
        if cfg.kl_stop is not None and seq_kl > cfg.kl_stop:
            # This policy drifted too far: restore the last one within bounds and stop.
            for p, g in zip(self.trainable, self.good_state):
                p.copy_(g)
            self.stopped = {"step": rollout.step, "kl": seq_kl}
            rollout.info.update(reason="kl_stop", kl=seq_kl, threshold=cfg.kl_stop)
            return False
        self.good_state = [p.detach().clone() for p in self.trainable]
        batch.update(old_logps=old_lp, old_values=values, advantages=adv, returns=returns)
        rollout.info.update(kl=seq_kl, kl_coef=beta)
        if cfg.adaptive_kl:  # for the next step; this one used ``beta``
            self.kl_ctl.update(seq_kl, 1)
        return True

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue alike: the adaptive KL coefficient."""
        return {"kl_coef": self.kl_ctl.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.value = float(state["kl_coef"])
        self.good_state = [p.detach().clone() for p in self.trainable]  # the restored policy is within bounds


UPDATE_METRICS = ("pg_loss", "value_loss", "clip_frac", "vf_clip_frac", "entropy", "approx_kl")


def ppo_metrics(cfg: PPOConfig):
    """A step's log line: reward-model (or verifier/proxy) score, KL to the reference and its coefficient,
    response length, the update metrics averaged over the step's minibatches, and the verifier's accuracy
    when it is not the reward."""

    def metrics(rollout: Rollout, updates: list[dict[str, float]]) -> dict[str, float]:
        outs = rollout.outputs
        m = {
            "score": float(rollout.rewards.mean()),
            "kl": rollout.info["kl"],
            "kl_coef": rollout.info["kl_coef"],
            "response_len": sum(len(o.token_ids) for o in outs) / len(outs),
            **{k: sum(u.get(k, float("nan")) for u in updates) / len(updates) for k in UPDATE_METRICS},
        }
        if cfg.reward != "verifier":
            correct = sum(R.score_completion(p, o.text)[0] for p, o in zip(rollout.problems, outs))
            m["verifier_accuracy"] = correct / len(outs)
        return m

    return metrics


def run_ppo(
    cfg: PPOConfig,
    out_dir: str | Path | None = None,
    model=None,
    tokenizer=None,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """The whole ``llmlab ppo`` run (see the module docstring); returns before/after and last-step metrics."""
    cfg.validate()
    if model is None:
        model, tokenizer = load_policy(cfg.model, cfg.train.device)
    out = Path(out_dir) if out_dir is not None else None
    scorer = make_scorer(cfg, tokenizer, model_device(model))
    ref = prepare_policy(model, cfg.use_lora, cfg.lora, frozen_reference=True)
    ac = ActorCritic(model, cfg.detach_value).to(model_device(model))
    advantages = PPOAdvantages(cfg, ac, ref)
    algo = RLAlgorithm(
        score=lambda r: scorer(r.problems, r.prompts, r.outputs),
        advantages=advantages,
        loss_fn=ppo_loss_fn(cfg.clip_eps, cfg.vf_clip, cfg.vf_coef),
        metrics=ppo_metrics(cfg),
        epochs=cfg.ppo_epochs,
        minibatch=cfg.minibatch,
        eval_scorer=scorer,
        eval_samples=cfg.eval_samples,
        progress={"score": "score", "kl": "kl", "len": "response_len"},
    )
    run = run_rl("ppo", cfg, algo, model, tokenizer, trained=ac, out=out, progress=progress, resume=resume)
    result: dict[str, Any] = {
        **{f"before_{k}": v for k, v in run.before.items()},
        **{f"after_{k}": v for k, v in run.after.items()},
    }
    if run.history:
        result.update({f"first_{k}": v for k, v in run.history[0].items()})
        result.update({f"last_{k}": v for k, v in run.history[-1].items()})
        result["mean_kl"] = sum(h["kl"] for h in run.history) / len(run.history)
    result["steps"] = run.steps
    result["kl_stopped"] = advantages.stopped
    if out is not None:
        write_report(out / "ppo_report.json", result)
    return result


def _pad_to(x: Tensor, width: int) -> Tensor:
    """Right-pad a ``[n, w]`` micro-batch tensor (trimmed by ``split_batch``) back to ``width`` columns."""
    if x.shape[1] == width:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], dim=1)
