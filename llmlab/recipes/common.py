"""What the stage recipes share, so that no recipe imports another.

- loading the model a stage starts from (:func:`load_base`, :func:`load_policy`) and getting a policy ready for
  preference/RL training (:func:`prepare_policy`: dropout off, LoRA, frozen reference);
- per-stage :class:`~llmlab.train.config.TrainConfig` defaults (:func:`sft_train_config`,
  :func:`distill_train_config`, :func:`preference_train_config`);
- the held-out task-suite exact match through the engine (:func:`task_exact_match`);
- the end of a run: the trained policy saved as a PEFT adapter or an llmlab checkpoint (:func:`save_policy`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from llmlab.data.tasks import evaluate as score_tasks
from llmlab.data.tasks import make_test_set, to_messages
from llmlab.errors import ConfigError
from llmlab.infer import LLM, SamplingParams
from llmlab.loading import load, resolve_model_path
from llmlab.model.checkpoint import save_checkpoint
from llmlab.model.lora import LoRAConfig, apply_lora, save_adapter
from llmlab.sft.chat import prompt_ids
from llmlab.train.config import TrainConfig
from llmlab.train.distributed import local_device


# ------------------------------------------------------------------------------------------ models
def load_base(
    base: str, tokenizer_needed: str | None = None, seq_len: int | None = None
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from anything ``llmlab.load`` reads, including the ``smollm2`` alias.

    ``tokenizer_needed`` (why the stage needs one) makes a base without a tokenizer an error; ``seq_len`` (the
    stage's ``train.seq_len``) must fit the model's context."""
    if not base:
        raise ConfigError("no base model: pass --base (a checkpoint dir, HF dir, .gguf file or 'smollm2')")
    model, tokenizer = load(base)
    if tokenizer_needed and tokenizer is None:
        raise ConfigError(f"{base}: has no tokenizer; {tokenizer_needed}")
    if seq_len is not None and seq_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"'train.seq_len' ({seq_len}) exceeds the model's max_seq_len ({model.cfg.max_seq_len})"
        )
    return model, tokenizer


def load_policy(path: str, device: str = "cpu") -> tuple[nn.Module, Any]:
    """A model and tokenizer (see :func:`load_base`) on ``device`` (a ``TrainConfig.device`` name: pass the
    stage's own, so that rollouts, cached reference log-probs and frozen copies are made where the Trainer
    will train)."""
    if not path:
        raise ConfigError("no base model: pass --base (or base=...): the checkpoint to start from")
    model, tok = load_base(path, tokenizer_needed="preference training needs one")
    return model.to(local_device(device)), tok


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the dropout probability of every dropout site the base was built with (residual and attention).

    A base built without dropout has no sites (``nn.Identity``), so only lowering, or keeping, is possible.
    """
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"config key 'dropout' must be in [0, 1), got {p}")
    if p > 0 and model.cfg.dropout == 0:
        raise ConfigError("config key 'dropout': the base was built without dropout, so it can only stay 0")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = p  # attention-probability dropout, passed to SDPA as dropout_p
    model.cfg = dataclasses.replace(model.cfg, dropout=p)


def prepare_policy(
    model: nn.Module, use_lora: bool, lora: LoRAConfig, frozen_reference: bool
) -> nn.Module | None:
    """Switch the policy's dropout off, wrap it with LoRA if asked and return its frozen reference copy, or None.

    Under LoRA there is never a copy: the reference is the same model with its adapter disabled. Dropout goes
    (as TRL's ``disable_dropout`` does by default): the reference, the rollout engine and the old-policy
    log-probs all run without it, so a policy trained with it compares its noisy log-probs to clean ones; the
    demo base was pretrained with dropout 0.1. LoRA's own dropout (``lora.dropout``) is kept.
    """
    set_dropout(model, 0.0)
    if use_lora:
        apply_lora(model, lora)
        return None
    return copy.deepcopy(model).eval().requires_grad_(False) if frozen_reference else None


# ------------------------------------------------------------------------------- train defaults
# SFT: a short warmup, no weight decay (the base's weights are the prior), one kept checkpoint, evaluation
# every 100 steps, no TensorBoard or plot.
SFT_TRAIN_DEFAULTS: dict[str, Any] = dict(
    warmup_steps=20,
    min_lr=0.0,
    weight_decay=0.0,
    eval_every=100,
    eval_batches=8,
    save_every=0,
    log_every=10,
    keep_last=1,
    tensorboard=False,
    plot=False,
    grad_clip=1.0,
)
# Distillation: no weight decay (the student starts from the teacher's weights: nothing to pull toward zero),
# checkpoints every 50 steps, one kept.
DISTILL_TRAIN_DEFAULTS: dict[str, Any] = dict(
    weight_decay=0.0,
    min_lr=0.0,
    warmup_steps=10,
    eval_every=50,
    save_every=50,
    keep_last=1,
    log_every=5,
    tensorboard=False,
)
# Alignment (reward model, DPO family, PPO, GRPO): fp32 (their losses compare small log-prob differences), no
# weight decay (it would pull the policy away from the reference), and no loss-spike guard (preference and RL
# losses legitimately sit near zero or jump between rollout batches; NaN/inf steps are still skipped).
PREFERENCE_TRAIN_DEFAULTS: dict[str, Any] = dict(weight_decay=0.0, spike_factor=0.0, precision="fp32")
# Online RL (PPO, GRPO): the alignment defaults at a constant, small learning rate, logged every step.
RL_TRAIN_DEFAULTS: dict[str, Any] = dict(
    PREFERENCE_TRAIN_DEFAULTS,
    lr=1e-5,
    min_lr=1e-6,
    eval_every=0,
    log_every=1,
    grad_clip=1.0,
    schedule="constant",
)


def sft_train_config(**overrides: Any) -> TrainConfig:
    """:data:`SFT_TRAIN_DEFAULTS` with ``overrides``."""
    return TrainConfig(**{**SFT_TRAIN_DEFAULTS, **overrides})


def distill_train_config(**overrides: Any) -> TrainConfig:
    """:data:`DISTILL_TRAIN_DEFAULTS` with ``overrides``."""
    return TrainConfig(**{**DISTILL_TRAIN_DEFAULTS, **overrides})


def preference_train_config(**overrides: Any) -> TrainConfig:
    """:data:`PREFERENCE_TRAIN_DEFAULTS` with ``overrides``."""
    return TrainConfig(**{**PREFERENCE_TRAIN_DEFAULTS, **overrides})


def rl_train_config(**overrides: Any) -> TrainConfig:
    """:data:`RL_TRAIN_DEFAULTS` with ``overrides``."""
    return TrainConfig(**{**RL_TRAIN_DEFAULTS, **overrides})


# ------------------------------------------------------------------------------------- evaluation
def task_exact_match(
    model: nn.Module, tokenizer: Any, template: str, per_task: int, max_new_tokens: int
) -> dict[str, Any]:
    """Greedy answers to the held-out task suite through the inference engine, scored by exact match."""
    records = make_test_set(per_task)
    prompts = [prompt_ids(tokenizer, to_messages(r)[:1], template) for r in records]
    stops = list(tokenizer.stop_ids)
    im_end = tokenizer.token_to_id("<|im_end|>")
    if im_end is not None and im_end not in stops:
        stops.append(im_end)
    was = model.training
    # fast=False: the fused decode path reads plain Linear weights, which LoRA/NF4 layers do not have.
    llm = LLM.from_model(model, tokenizer, fast=False, max_batch_size=32, kv_cache_mb=64)
    outs = llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=stops)
    )
    model.train(was)
    texts = [
        tokenizer.decode([t for t in o.token_ids if t not in stops], skip_special_tokens=True) for o in outs
    ]
    result = score_tasks(records, texts)
    result["examples"] = [
        {"prompt": r["prompt"], "answer": r["answer"], "got": t} for r, t in zip(records[:3], texts)
    ]
    return result


# -------------------------------------------------------------------------------------- reports
def format_value(x: Any) -> str:
    """A report value for a summary line: ``-`` for None, floats to 4 decimals."""
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


# -------------------------------------------------------------------------------------- artefacts
def adapter_base_path(base: str | None) -> str | None:
    """What an adapter records as ``base_model_name_or_path``: a path PEFT and ``llmlab.load`` can open (the
    ``smollm2`` alias resolved to its GGUF file, relative paths made absolute)."""
    if not base:
        return None
    return str(resolve_model_path(base).resolve())


def save_policy(
    model: nn.Module,
    tokenizer: Any,
    directory: str | Path,
    *,
    adapter: bool,
    base: str | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """The trained policy: a PEFT adapter (``adapter=True``; ``adapter_config.json`` +
    ``adapter_model.safetensors`` in ``directory``, recording ``base``) or a full llmlab checkpoint."""
    if adapter:
        return save_adapter(model, directory, base_model=adapter_base_path(base))
    return save_checkpoint(directory, model, tokenizer, extra_config=extra_config)
