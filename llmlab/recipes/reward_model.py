"""``llmlab rm``: a reward model (the policy's trunk + a scalar head, :mod:`llmlab.align.reward_model`) trained
with the Bradley-Terry loss on preference pairs through the shared Trainer; held-out pairwise accuracy and the
margin distribution (``reward_margins.png``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from llmlab.align.data import DataStats, encode_pairs, load_pairs, split_pairs
from llmlab.align.reward_model import (
    RM_KEY,
    RewardModel,
    RewardPairSource,
    evaluate_reward_model,
    plot_margins,
    rewards_of,
)
from llmlab.align.rollout import OnPolicyConfig, gather_pairs
from llmlab.errors import ConfigError
from llmlab.losses import LossOutput, bradley_terry_loss
from llmlab.recipes.common import load_policy, preference_train_config
from llmlab.train import Trainer
from llmlab.train.config import TrainConfig
from llmlab.train.logging import write_report


def make_rm_loss(use_margin: bool = False):
    """Bradley-Terry loss over a :class:`RewardPairSource` batch (per-pair sum, weight = pairs)."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> Any:
        r = rewards_of(model, batch)
        B = r.shape[0] // 2
        rc, rr = r[:B], r[B:]
        losses = bradley_terry_loss(rc, rr, batch["margin"] if use_margin else None)
        diff = (rc - rr).detach()
        metrics = {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}
        return LossOutput(losses.sum(), float(B), metrics)

    return loss_fn


@dataclass
class RMConfig:
    """``llmlab rm`` settings: start from ``model`` (usually the SFT checkpoint), train a scalar head and the
    trunk with the Bradley-Terry loss, report held-out accuracy and the margin distribution."""

    model: str = ""
    data: list[str] = field(default_factory=lambda: ["hh-rlhf"])
    heldout: str | None = "hh-rlhf-heldout"  # None: split n_heldout pairs off the data
    n_heldout: int = 312
    max_pairs: int | None = None
    max_len: int = 256
    use_margin: bool = False  # use each pair's "margin" field in the loss
    # "onpolicy:SOURCE" data: pairs sampled from the starting (SFT) model, judged by the verifier
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    skip_invalid: bool = False
    eval_batch_size: int = 16
    train: TrainConfig = field(
        default_factory=lambda: preference_train_config(
            lr=1e-5, min_lr=1e-6, warmup_steps=10, max_steps=200, batch_size=8, eval_every=50, log_every=10
        )
    )

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("config key 'data' needs at least one preference source")
        if self.max_len < 8:
            raise ConfigError(f"config key 'max_len' must be >= 8, got {self.max_len}")


def run_reward_model(
    cfg: RMConfig, out_dir: str | Path, model=None, tokenizer=None, resume: bool = False
) -> dict[str, Any]:
    """Train a reward model; writes ``OUT/final`` (a reward-model checkpoint), ``reward_margins.png`` and
    ``rm_eval.json``. Returns the final metrics. ``resume`` continues from ``OUT``'s latest checkpoint (the
    pairs are rebuilt alike: they depend on the seed and the starting model only)."""
    cfg.validate()
    out = Path(out_dir)
    if model is None:
        model, tokenizer = load_policy(cfg.model, cfg.train.device)
    stats = DataStats()
    # On-policy sources sample the causal LM before it becomes the reward model's trunk.
    policy = None if isinstance(model, RewardModel) else model
    pairs = gather_pairs(
        cfg.data, policy, tokenizer, stats, cfg.skip_invalid, cfg.max_pairs, cfg.onpolicy, cfg.train.seed
    )
    rm = model if isinstance(model, RewardModel) else RewardModel.from_backbone(model)
    if cfg.heldout is not None:
        train_pairs, held_pairs = pairs, load_pairs(cfg.heldout, cfg.skip_invalid, stats, cfg.n_heldout)
    else:
        train_pairs, held_pairs = split_pairs(pairs, min(cfg.n_heldout, len(pairs) // 5), seed=cfg.train.seed)
    pad = tokenizer.pad_id
    train_src = RewardPairSource(
        encode_pairs(tokenizer, train_pairs, cfg.max_len, cfg.skip_invalid, stats),
        cfg.train.batch_size,
        pad,
        seed=cfg.train.seed,
    )
    held_src = RewardPairSource(
        encode_pairs(tokenizer, held_pairs, cfg.max_len, cfg.skip_invalid, stats), cfg.train.batch_size, pad
    )
    trainer = Trainer(
        rm,
        cfg.train,
        train_src,
        loss_fn=make_rm_loss(cfg.use_margin),
        eval_fn=lambda m: evaluate_reward_model(m, held_src, cfg.eval_batch_size).summary(),
        tokenizer=tokenizer,
        out_dir=out,
        extra_config={RM_KEY: {"head": "score"}},
    )
    if resume:
        trainer.resume()
    metrics = trainer.fit()
    ev = evaluate_reward_model(rm, held_src, cfg.eval_batch_size)
    plot_margins(ev.margins, out / "reward_margins.png")
    report = {
        **ev.summary(),
        "pairs_train": len(train_src.pairs),
        "pairs_heldout": len(held_src.pairs),
        "skipped_invalid": stats.skipped_invalid,
        "truncated": stats.truncated,
        "contaminates": sorted({p.contaminates for p in pairs if p.contaminates}),
    }
    write_report(out / "rm_eval.json", report)
    return {**metrics, **{f"heldout_{k}": v for k, v in report.items()}}
