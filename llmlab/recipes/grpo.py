"""GRPO with verifiable rewards (Shao et al. 2024, DeepSeekMath): no value model, no reward model.

Each step samples ``prompts_per_step`` problems and ``group_size`` completions per problem from the live policy
(through the shared inference engine), scores them with the verifier (exact match on the parsed final answer
plus a small format reward), normalizes rewards within each group (:func:`~llmlab.losses.grpo_advantages`)
and takes ``epochs`` optimizer steps of the clipped objective with a k3 KL penalty to the reference
(:func:`~llmlab.losses.grpo_loss`) through ``Trainer.train_step``. The reference is the starting policy:
with LoRA the same weights with the adapter disabled, otherwise a frozen copy.

``loss_type`` picks how token losses are averaged, with TRL's names (:func:`~llmlab.losses
.grpo_aggregate`): ``grpo`` (per completion, then over completions), ``dapo`` (over all tokens of the rollout
batch) or ``dr_grpo`` (a constant ``completions x max_new_tokens``); ``scale_rewards=false`` with ``dr_grpo``
is Dr. GRPO (Liu et al. 2025), which drops both the length and the std normalization.

Logged per step: reward mean, the mean within-group reward std, the fraction of groups whose samples all
scored the same (zero variance: no learning signal), accuracy, format rate, completion length, KL, clip
fraction; held-out exact match (greedy) every ``eval_every`` steps and at the start and end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmlab import losses as L
from llmlab.align import rollout as R
from llmlab.errors import ConfigError
from llmlab.recipes.common import load_policy, prepare_policy, rl_train_config
from llmlab.recipes.rl_loop import RLAlgorithm, RLConfig, Rollout, reference_logps, run_rl
from llmlab.train.config import TrainConfig
from llmlab.train.logging import write_report


@dataclass
class GRPOConfig(RLConfig):
    group_size: int = 8
    top_p: float = 1.0
    beta: float = 0.04  # KL coefficient (k3 estimator); 0 = no reference model
    clip_eps: float = 0.2
    epochs: int = 1  # optimizer steps per rollout batch (> 1 makes the clip matter)
    loss_type: str = "grpo"  # grpo | dapo | dr_grpo: how token losses are averaged (losses.grpo_aggregate)
    # Divide advantages by the group's reward std (False: Dr. GRPO's centring only).
    scale_rewards: bool = True
    format_weight: float = 0.1
    eval_every: int = 25
    train: TrainConfig = field(
        default_factory=lambda: rl_train_config(warmup_steps=5, max_steps=100, batch_size=16)
    )

    def validate(self) -> None:
        if self.group_size < 2:
            raise ConfigError(
                f"config key 'group_size' must be >= 2 (advantages compare samples), got {self.group_size}"
            )
        super().validate()
        if self.epochs <= 0:
            raise ConfigError(f"config key 'epochs' must be positive, got {self.epochs}")
        if self.loss_type not in L.GRPO_LOSS_TYPES:
            raise ConfigError(
                f"config key 'loss_type' must be one of {', '.join(L.GRPO_LOSS_TYPES)}, got {self.loss_type!r}"
            )
        if self.beta < 0 or self.clip_eps <= 0:
            raise ConfigError("config keys 'beta' >= 0 and 'clip_eps' > 0 required")


GRPO_PRESETS: dict[str, GRPOConfig] = {
    # GRPO of the tiny SFT model (pass model=...) on the three counting/conversion tasks: 350 steps of 8
    # prompts x 16 samples at lr 4e-5, ~13 CPU minutes at 1 thread (results and the learning rates tried:
    # BENCHMARKS.md, "Preset run histories").
    "tiny-grpo": GRPOConfig(
        source="tasks:count_letters,count_words,unit_conversion",
        n_train=2000,
        n_eval=270,
        group_size=16,
        prompts_per_step=8,
        max_new_tokens=20,
        temperature=1.0,
        beta=0.04,
        eval_every=0,
        micro_batch=32,
        train=rl_train_config(
            lr=4e-5, min_lr=4e-5, warmup_steps=0, max_steps=350, batch_size=32, log_every=10
        ),
    ),
}


def grpo_loss_fn(
    clip_eps: float, beta: float, loss_type: str = "grpo", max_completion_length: int | None = None
):
    """``loss_fn(model, batch)``: the per-token GRPO loss aggregated by ``loss_type``
    (:func:`llmlab.losses.grpo_aggregate`, TRL's rule of the same name)."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        lp = L.token_logps(logits, batch["labels"])
        mask = (batch["labels"] != -100).to(lp.dtype)
        old = batch["old_logps"] if "old_logps" in batch else lp.detach()
        ref = batch.get("ref_logps") if beta > 0 else None
        loss, kl, clipped = L.grpo_loss(lp, old, ref, batch["advantages"], clip_eps, beta)
        loss_sum, weight = L.grpo_aggregate(loss, mask, loss_type, max_completion_length)
        metrics = {
            "kl": float(L.masked_mean(kl.detach(), mask)),
            "clip_frac": float(L.masked_mean(clipped.float(), mask)),
        }
        return L.LossOutput(loss_sum, weight, metrics)

    return loss_fn


def grpo_algorithm(cfg: GRPOConfig, model: nn.Module, ref: nn.Module | None) -> RLAlgorithm:
    """GRPO for :func:`~llmlab.recipes.rl_loop.run_rl`: the verifier's reward (exact match + a format
    reward), group-normalized advantages, reference log-probs for the KL term, old log-probs when one rollout
    batch makes several updates, and the loss of ``cfg.loss_type``."""

    def score(rollout: Rollout) -> Tensor:
        scored = [
            R.verifier_reward(p, o.text, cfg.format_weight) for p, o in zip(rollout.problems, rollout.outputs)
        ]
        rollout.info["scored"] = scored
        return torch.tensor([s[0] for s in scored])

    def advantages(rollout: Rollout) -> bool:
        batch = rollout.batch
        adv = L.grpo_advantages(rollout.rewards, cfg.group_size, scale=cfg.scale_rewards)
        batch["advantages"] = adv.to(batch["input_ids"].device)
        if cfg.beta > 0:
            batch["ref_logps"] = reference_logps(model, ref, batch, cfg.use_lora, cfg.micro_batch)
        if cfg.epochs > 1:
            batch["old_logps"] = R.batch_token_logps(model, batch, cfg.micro_batch)
        return True

    def metrics(rollout: Rollout, updates: list[dict[str, float]]) -> dict[str, float]:
        scored, outs, last = rollout.info["scored"], rollout.outputs, updates[-1]
        stds = rollout.rewards.view(-1, cfg.group_size).std(dim=1)
        return {
            "reward_mean": float(rollout.rewards.mean()),
            "reward_std": float(stds.mean()),
            "zero_std_frac": float((stds < 1e-6).float().mean()),
            "accuracy": sum(s[1] for s in scored) / len(scored),
            "format_ok": sum(s[2] for s in scored) / len(scored),
            "completion_len": sum(len(o.token_ids) for o in outs) / len(outs),
            "kl": last.get("kl", 0.0),
            "clip_frac": last.get("clip_frac", 0.0),
            "loss": last["loss"],
            "grad_norm": last["grad_norm"],
            "lr": last["lr"],
        }

    return RLAlgorithm(
        score=score,
        advantages=advantages,
        loss_fn=grpo_loss_fn(cfg.clip_eps, cfg.beta, cfg.loss_type, cfg.max_new_tokens),
        metrics=metrics,
        group_size=cfg.group_size,
        epochs=cfg.epochs,
        top_p=cfg.top_p,
        progress={"reward": "reward_mean", "acc": "accuracy", "kl": "kl"},
    )


def run_grpo(
    cfg: GRPOConfig,
    out_dir: str | Path | None = None,
    model=None,
    tokenizer=None,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """The whole ``llmlab grpo`` run; returns held-out exact match before/after and the last step's metrics."""
    cfg.validate()
    if model is None:
        model, tokenizer = load_policy(cfg.model, cfg.train.device)
    out = Path(out_dir) if out_dir is not None else None
    ref = prepare_policy(model, cfg.use_lora, cfg.lora, frozen_reference=cfg.beta > 0)
    algo = grpo_algorithm(cfg, model, ref)
    run = run_rl("grpo", cfg, algo, model, tokenizer, out=out, progress=progress, resume=resume)
    result = {
        **{f"before_{k}": v for k, v in run.before.items()},
        **{f"after_{k}": v for k, v in run.after.items()},
    }
    result.update(run.history[-1] if run.history else {})
    result["reward_mean_first"] = run.history[0]["reward_mean"] if run.history else float("nan")
    if out is not None:
        write_report(out / "grpo_report.json", result)
    return result
