"""The online RL loop PPO and GRPO share: sample → score → advantages → update → log / evaluate → save.

Each step draws ``prompts_per_step`` training problems (a pure function of the seed and the step), samples
``group_size`` completions per prompt from the live policy through the inference engine, and builds a
right-padded batch whose labels are the completions. The algorithm (:class:`RLAlgorithm`) supplies what
differs: the **scorer** (rewards per completion), the **advantage function** (fills the batch with what its
loss reads: advantages, old and reference log-probs, value targets; it may end the run), the **loss**
(``loss_fn`` for :meth:`Trainer.train_step`) and its **metrics**. The update is ``epochs`` passes over the
batch, in shuffled minibatches or whole, each one :meth:`Trainer.train_step` over micro-batches.

Held-out exact match (and, with an ``eval_scorer``, its score) is measured before and after; the trained
policy is saved as ``OUT/final`` or, under LoRA, ``OUT/adapter``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlab.align import rollout as R
from llmlab.errors import ConfigError
from llmlab.losses import LossFn
from llmlab.model.lora import LoRAConfig, disable_adapter
from llmlab.recipes.common import rl_train_config, save_policy
from llmlab.train import Trainer
from llmlab.train.config import TrainConfig
from llmlab.train.distributed import to_device
from llmlab.train.logging import config_dict


@dataclass
class RLConfig:
    """The settings every online RL recipe has (PPO and GRPO extend it)."""

    model: str = ""  # the policy to start from (an SFT checkpoint; --base on the command line)
    source: str = "tasks"  # prompts: tasks[:a,b] | svamp | multiarith | addsub | singleeq | gsm8k
    n_train: int | None = 2000
    n_eval: int = 90
    prompts_per_step: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0
    micro_batch: int = 16
    eval_every: int = 0
    use_lora: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=rl_train_config)

    def validate(self) -> None:
        for k in ("prompts_per_step", "max_new_tokens", "micro_batch"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"config key '{k}' must be positive, got {getattr(self, k)}")


Scorer = Callable[[Sequence[Any], Sequence[list[int]], Sequence[Any]], Tensor]


@dataclass
class Rollout:
    """One step's samples: the problems and prompt ids (repeated ``group_size`` times each), the engine's
    outputs, their rewards, the training batch (on the Trainer's device) and what the algorithm records."""

    step: int
    problems: list[Any]
    prompts: list[list[int]]
    outputs: list[Any]
    batch: dict[str, Tensor] = field(default_factory=dict)
    rewards: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RLAlgorithm:
    """What an online RL recipe hands :func:`run_rl`.

        ``score(rollout) -> rewards [N]``; ``advantages(rollout)`` adds its loss's inputs to ``rollout.batch`` and
        returns True, or False to stop the run before this step's update (``rollout.info`` says why: it goes to the
    log as a ``stop`` event); ``loss_fn`` is the Trainer's loss;
        ``metrics(rollout, updates)`` the step's log line from the rollout and the ``train_step`` metrics of its
        updates. ``eval_scorer`` also scores the held-out greedy answers (and ``eval_samples`` sampled ones per
        problem) before and after. ``progress`` maps progress-bar labels to metric keys.
    """

    score: Callable[[Rollout], Tensor]
    advantages: Callable[[Rollout], bool]
    loss_fn: LossFn
    metrics: Callable[[Rollout, list[dict[str, float]]], dict[str, float]]
    group_size: int = 1
    epochs: int = 1
    minibatch: int | None = None  # None: each epoch updates on the whole batch, in order
    top_p: float = 1.0
    eval_scorer: Scorer | None = None
    eval_samples: int = 0
    progress: dict[str, str] = field(default_factory=dict)


@dataclass
class RLRun:
    """What :func:`run_rl` returns: held-out metrics before/after, each step's metrics, the steps taken."""

    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, float]]
    steps: int


class RolloutPosition:
    """The Trainer's data position for checkpoints: the RL step (rollouts are a function of (seed, step)),
    plus the state the algorithm keeps between steps (PPO's adaptive KL coefficient), when it has one."""

    def __init__(self, algo_state: Any = None) -> None:
        self.step = 0
        self.algo_state = algo_state  # an object with state_dict()/load_state_dict(), or None

    def state_dict(self) -> dict[str, Any]:
        algo = self.algo_state.state_dict() if self.algo_state is not None else {}
        return {"step": self.step, "algo": algo}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        if self.algo_state is not None and state.get("algo"):
            self.algo_state.load_state_dict(state["algo"])


BEFORE_FILE = "rl_before.json"  # held-out metrics of the starting policy, kept for a resumed run's report


def run_rl(
    name: str,
    cfg: RLConfig,
    algo: RLAlgorithm,
    model: nn.Module,
    tokenizer: Any,
    trained: nn.Module | None = None,
    out: Path | None = None,
    progress: bool = True,
    resume: bool = False,
) -> RLRun:
    """Train the policy ``model`` (through ``trained``, the module the Trainer updates: the policy itself or
    a wrapper such as PPO's actor-critic) for ``cfg.train.max_steps`` rollout steps.

    With ``out``, a checkpoint (policy, optimizer, RNG, rollout step, algorithm state) is written every
    ``cfg.train.save_every`` rollout steps; ``resume`` continues from the latest one, so a killed run redoes
    at most ``save_every`` steps and ends with the same policy (rollouts depend only on the seed, the step and
    the restored policy). A resumed run's ``history`` holds the steps it ran itself."""
    seed, max_steps = cfg.train.seed, cfg.train.max_steps
    train_problems = R.load_problems(cfg.source, "train", cfg.n_train, seed=seed)
    eval_problems = R.load_problems(cfg.source, "test", cfg.n_eval, seed=seed)
    rows = cfg.prompts_per_step * algo.group_size
    updates = algo.epochs * (-(-rows // algo.minibatch) if algo.minibatch else 1)
    position = RolloutPosition(algo.advantages if hasattr(algo.advantages, "state_dict") else None)
    trainer = Trainer(
        trained if trained is not None else model,
        dataclasses.replace(cfg.train, max_steps=max_steps * updates, eval_every=0, save_every=0),
        position,
        loss_fn=algo.loss_fn,
        tokenizer=tokenizer,
        out_dir=out,
        extra_config={name: config_dict(cfg)},
    )

    def held_out(sampled: bool) -> dict[str, float]:
        res = R.evaluate_problems(model, tokenizer, eval_problems, cfg.max_new_tokens, algo.eval_scorer)
        if sampled and algo.eval_samples > 0:  # the same draws before and after (fixed seed): a paired change
            res["sampled_reward_score"] = R.sampled_reward_score(
                model,
                tokenizer,
                eval_problems,
                algo.eval_scorer,
                algo.eval_samples,
                cfg.max_new_tokens,
                cfg.temperature,
                seed=seed + 1_000_003,
            )
        return res

    before_file = out / BEFORE_FILE if out is not None else None
    if resume and before_file is not None and before_file.is_file() and trainer.resume():
        before = json.loads(before_file.read_text(encoding="utf-8"))
    else:
        before = held_out(sampled=True)
        trainer.logger.log(0, before, prefix="val")
        if before_file is not None:
            out.mkdir(parents=True, exist_ok=True)
            before_file.write_text(json.dumps(before), encoding="utf-8")
    history: list[dict[str, float]] = []
    bar = (
        tqdm(total=max_steps, initial=position.step, desc=name, unit="step", dynamic_ncols=True)
        if progress
        else None
    )
    for step in range(position.step, max_steps):
        t0 = time.perf_counter()
        rng = random.Random(seed * 1_000_003 + step)
        problems = rng.sample(train_problems, min(cfg.prompts_per_step, len(train_problems)))
        prompts = [R.prompt_token_ids(tokenizer, p) for p in problems]
        flat_prompts = [p for p in prompts for _ in range(algo.group_size)]
        flat_problems = [p for p in problems for _ in range(algo.group_size)]
        outs = R.generate(
            model,
            tokenizer,
            flat_prompts,
            cfg.max_new_tokens,
            cfg.temperature,
            algo.top_p,
            seed=seed * 7919 + step,
        )
        rollout = Rollout(step, flat_problems, flat_prompts, outs)
        rollout.rewards = algo.score(rollout)
        # The batch lives where the Trainer keeps the policy: log-probs, values and advantages are made there.
        batch = R.rl_batch(flat_prompts, [o.token_ids for o in outs], tokenizer.pad_id)
        rollout.batch = to_device(batch, trainer.device)
        if not algo.advantages(rollout):
            trainer.logger.event(step, "stop", **rollout.info)
            break
        rollout_s = time.perf_counter() - t0
        results = [
            trainer.train_step(R.split_batch(part, cfg.micro_batch)) for part in _update_parts(rollout, algo)
        ]
        position.step = step + 1
        metrics = {
            **algo.metrics(rollout, results),
            "rollout_s": rollout_s,
            "step_s": time.perf_counter() - t0,
        }
        history.append(metrics)
        trainer.logger.log(step + 1, metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({label: f"{metrics[key]:.3g}" for label, key in algo.progress.items()})
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < max_steps:
            trainer.logger.log(step + 1, held_out(sampled=False), prefix="val")
        if out is not None and cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
            trainer.save()
    if bar is not None:
        bar.close()
    after = held_out(sampled=True)
    trainer.logger.log(position.step, after, prefix="val")
    trainer.logger.close()
    if out is not None:
        save_policy(
            model,
            tokenizer,
            out / ("adapter" if cfg.use_lora else "final"),
            adapter=cfg.use_lora,
            base=cfg.model,
            extra_config={name: {"steps": position.step}},
        )
    return RLRun(before, after, history, position.step)


def _update_parts(rollout: Rollout, algo: RLAlgorithm) -> list[dict[str, Tensor]]:
    """The batches of this step's optimizer updates: ``epochs`` passes, each over shuffled minibatches
    (seeded by step and epoch) or the whole batch."""
    batch, n = rollout.batch, len(rollout.outputs)
    parts = []
    for epoch in range(algo.epochs):
        if algo.minibatch is None:
            parts.append(batch)
            continue
        order = torch.randperm(n, generator=torch.Generator().manual_seed(rollout.step * 31 + epoch))
        for s in range(0, n, algo.minibatch):
            idx = order[s : s + algo.minibatch]
            parts.append({k: v[idx] for k, v in batch.items()})
    return parts


def reference_logps(
    model: nn.Module, ref: nn.Module | None, batch: dict[str, Tensor], use_lora: bool, chunk: int
) -> Tensor:
    """Per-token reference log-probs: the policy with its adapter disabled under LoRA, else the frozen copy."""
    if use_lora:
        with disable_adapter(model):
            return R.batch_token_logps(model, batch, chunk)
    return R.batch_token_logps(ref, batch, chunk)
