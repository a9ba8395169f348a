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

Outputs in ``out``: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) for lora, qlora,
dora, ia3, prefix and prompt (llmlab's documented bottleneck format for ``adapter``; see llmlab.model.peft), or
``final/`` (an llmlab checkpoint with the chat template in its tokenizer) for full fine-tuning; the trainer's
``ckpt-*/`` (resume), ``metrics.jsonl``, and ``sft_report.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmlab.config import build_config
from llmlab.data.tasks import make_sft_examples
from llmlab.errors import ConfigError
from llmlab.losses import causal_lm_loss
from llmlab.model.lora import LoRAConfig, apply_lora, describe
from llmlab.model.peft import BottleneckConfig, IA3Config, PrefixConfig, PromptConfig, apply_peft, save_peft
from llmlab.quant.qlora import quantize_for_qlora
from llmlab.recipes.common import (
    adapter_base_path,
    format_value,
    load_base,
    save_policy,
    set_dropout,
    sft_train_config,
    task_exact_match,
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
from llmlab.sft.forgetting import (
    EarlyStopping,
    freeze_for_forgetting,
    general_text_batches,
    make_loss_fn,
    replay_teacher,
    replay_tokens,
    resolve_corpus,
)
from llmlab.train import Trainer
from llmlab.train.config import TrainConfig
from llmlab.train.distributed import local_device
from llmlab.train.evaluation import evaluate_loss
from llmlab.train.logging import config_dict, write_report

PEFT_MODES = ("none", "lora", "qlora", "dora", "ia3", "prefix", "prompt", "adapter")
# Methods whose base cannot be switched back on by disable_adapter (so no replay-KD teacher for free).
NO_BASE_SWITCH = ("ia3", "prefix", "prompt", "adapter")
# Flat override aliases accepted by ``llmlab sft`` (``lora_r=8`` is ``lora.r=8``).
ALIASES = {
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_targets": "lora.targets",
    "prefix_tokens": "prefix.tokens",
    "prefix_projection": "prefix.projection",
    "prompt_tokens": "prompt.tokens",
    "adapter_size": "adapter.size",
    "adapter_where": "adapter.where",
    "ia3_targets": "ia3.targets",
}


@dataclass
class SFTConfig:
    base: str = (
        ""  # llmlab checkpoint dir, HF dir, .gguf file, or "smollm2" (the bundled SmolLM2-135M-Instruct)
    )
    data: str = "tasks"  # a file, a shipped set (alpaca, gsm8k, math) or "tasks" (the verifiable task suite)
    peft: str = "none"
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # lora, qlora and dora
    ia3: IA3Config = field(default_factory=IA3Config)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    adapter: BottleneckConfig = field(default_factory=BottleneckConfig)  # Houlsby bottleneck adapters
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
    # the summary flags forgetting when the general-text loss rose more than this (percent) over the base's
    forget_warn_pct: float = 10.0
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
        if self.forget_warn_pct < 0:
            raise ConfigError(f"config key 'forget_warn_pct' must be >= 0, got {self.forget_warn_pct}")
        if self.l2sp < 0 or self.freeze_layers < 0 or self.early_stop_patience < 0:
            raise ConfigError("config keys 'l2sp', 'freeze_layers' and 'early_stop_patience' must be >= 0")
        if self.peft in NO_BASE_SWITCH and self.replay_fraction and self.replay_loss == "kd":
            raise ConfigError(
                "'replay_loss=kd' needs the base as teacher: use it with peft none, lora, qlora or dora"
            )
        if self.peft != "none" and (self.freeze_layers or self.train_modules):
            raise ConfigError("'freeze_layers'/'train_modules' apply to full fine-tuning (peft=none) only")


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
        train=sft_train_config(
            lr=1e-3, max_steps=5000, warmup_steps=100, batch_size=batch_size, seq_len=256, eval_every=500
        ),
    )


def _smollm2_alpaca(peft: str, targets: list[str]) -> SFTConfig:
    """SmolLM2-135M-Instruct on CPU: a handful of LoRA / QLoRA steps on shipped Alpaca data."""
    return SFTConfig(
        base="smollm2",
        data="alpaca",
        peft=peft,
        max_len=256,
        max_examples=2000,
        general_corpus="wikitext2-test",
        general_eval_tokens=4096,
        lora=LoRAConfig(r=8, alpha=16, targets=targets),
        task_eval_per_task=2,
        train=sft_train_config(
            lr=2e-4, max_steps=10, batch_size=4, seq_len=256, warmup_steps=2, eval_every=0, eval_batches=2
        ),
    )


SFT_PRESETS: dict[str, SFTConfig] = {
    # Full fine-tuning of the demo model on the task suite with its forgetting kept small (~35 min on 2 cores).
    "tiny-tasks": _tiny_tasks(batch_size=8),
    # The same recipe on 4x the data per step (results: BENCHMARKS.md, "Preset run histories").
    "tiny-tasks-full": _tiny_tasks(batch_size=32),
    # Two minutes, for trying the stage: the plain recipe with no forgetting control (it forgets badly).
    "tiny-tasks-quick": SFTConfig(
        data="tasks",
        peft="none",
        max_len=128,
        train=sft_train_config(lr=1e-3, max_steps=400, batch_size=16, seq_len=128),
    ),
    # The same with forgetting controls: lower LR, replay of pretraining text, L2-SP and early stopping.
    "tiny-tasks-gentle": SFTConfig(
        data="tasks",
        peft="none",
        max_len=128,
        replay_fraction=0.2,
        l2sp=1e-3,
        early_stop_patience=2,
        train=sft_train_config(lr=3e-4, max_steps=400, batch_size=16, seq_len=128),
    ),
    "tiny-tasks-lora": SFTConfig(
        data="tasks",
        peft="lora",
        max_len=128,
        lora=LoRAConfig(r=16, alpha=32, targets=["all"]),
        train=sft_train_config(lr=3e-3, max_steps=400, batch_size=16, seq_len=128),
    ),
    "smollm2-lora": _smollm2_alpaca("lora", ["q", "k", "v", "o"]),
    "smollm2-qlora": _smollm2_alpaca("qlora", ["all"]),
}


def load_sft_config(
    preset: str | None = None, yaml_path: str | None = None, overrides: list[str] | None = None
) -> SFTConfig:
    """Preset, then YAML, then ``key=value`` overrides (bare ``max_steps`` is ``train.max_steps``; ``ALIASES``)."""
    return build_config(SFTConfig, SFT_PRESETS, preset, yaml_path, overrides, ALIASES)


# ---------------------------------------------------------------------------------------- pieces
def mean_loss(model: Any, batches: list[dict]) -> float:
    """Weighted mean causal-LM loss over fixed batches (no grad, bf16 autocast as in training)."""
    return evaluate_loss(model, batches, causal_lm_loss, autocast=torch.bfloat16)["loss"]


# ---------------------------------------------------------------------------------------- the run
def chat_tokenizer(tokenizer: Any, template_mode: str) -> tuple[Any, str]:
    """The tokenizer and chat template SFT renders with: the tokenizer's own template (``auto``), else ChatML
    on a copy of the tokenizer that knows ``<|im_end|>`` as a stop token."""
    if template_mode == "auto" and tokenizer.chat_template:
        return tokenizer, tokenizer.chat_template
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if tokenizer.token_to_id(t) is None]
    if missing:
        raise ConfigError(
            f"the ChatML template needs special token {missing[0]} in the tokenizer's vocabulary"
        )
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = CHATML_TEMPLATE
    if "<|im_end|>" not in tokenizer.extra_stop_tokens:
        tokenizer.extra_stop_tokens = [*tokenizer.extra_stop_tokens, "<|im_end|>"]
    return tokenizer, CHATML_TEMPLATE


def sft_examples(cfg: SFTConfig, tokenizer: Any, template: str) -> tuple[list, list, LoadStats]:
    """(train examples, held-out examples, load statistics): records read or generated, deduplicated,
    split, tokenized with assistant-only labels."""
    stats = LoadStats()
    if cfg.data == "tasks":
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
    return train_ex, val_ex, stats


def run_sft(cfg: SFTConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """The whole SFT run (see the module docstring); returns and writes the report."""
    cfg.validate()
    out_dir = Path(out_dir)
    t_start = time.time()
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_base(cfg.base, "SFT needs one to render chats", cfg.train.seq_len)
    # On the Trainer's device from the start: the before-training evaluation and the frozen copies (replay
    # teacher, L2-SP anchors) are then made there too.
    model = model.float().to(local_device(cfg.train.device))
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    tokenizer, template = chat_tokenizer(tokenizer, cfg.template)
    train_ex, val_ex, stats = sft_examples(cfg, tokenizer, template)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    t = cfg.train
    val_rows = val_ex[: t.eval_batches * t.batch_size * 4]
    val_batches = list(iterate_examples(val_rows, t.batch_size, t.seq_len, pad_id, cfg.pack))[
        : t.eval_batches
    ]
    general = general_text_batches(
        tokenizer,
        resolve_corpus(cfg.general_corpus, cfg.base),
        cfg.general_eval_tokens,
        min(t.seq_len, model.cfg.max_seq_len),
        t.batch_size,
    )

    def held_out(m: Any) -> dict[str, float]:
        metrics = {"general_loss": mean_loss(m, general)}
        if val_batches:
            metrics["loss"] = mean_loss(m, val_batches)
        return metrics

    def measure(tasks: bool) -> dict[str, Any]:
        out = held_out(model)
        measured: dict[str, Any] = {"sft_val_loss": out.get("loss"), "general_loss": out["general_loss"]}
        if tasks:
            measured["tasks"] = task_exact_match(
                model, tokenizer, template, cfg.task_eval_per_task, cfg.max_new_tokens
            )
        return measured

    report: dict[str, Any] = {
        "base": cfg.base,
        "data": cfg.data,
        "peft": cfg.peft,
        "examples": {"train": len(train_ex), "val": len(val_ex), **dataclasses.asdict(stats)},
        "before": measure(bool(cfg.task_eval_per_task and cfg.task_eval_before)),
    }
    if cfg.peft == "qlora":
        report["qlora_memory"] = quantize_for_qlora(
            model, cfg.lora.targets, cfg.qlora_block_size, cfg.qlora_double_quant
        )
        # The NF4 base itself, before any training: separates quantization error from what SFT changes.
        nf4 = measure(False)
        report["before"]["sft_val_loss_nf4"] = nf4["sft_val_loss"]
        report["before"]["general_loss_nf4"] = nf4["general_loss"]
    adapter = cfg.peft != "none"
    if cfg.peft in ("lora", "qlora"):
        apply_lora(model, cfg.lora)
    elif adapter:  # DoRA, IA3, prefix, prompt or bottleneck adapters (llmlab.model.peft)
        apply_peft(model, cfg.peft, cfg.lora if cfg.peft == "dora" else getattr(cfg, cfg.peft))
    else:
        freeze_for_forgetting(model, cfg.freeze_layers, cfg.train_modules)
    report["params"] = describe(model)

    replay = (
        replay_tokens(tokenizer, resolve_corpus(cfg.replay_corpus, cfg.base)) if cfg.replay_fraction else None
    )
    source = SFTBatchSource(
        train_ex,
        t.batch_size,
        t.seq_len,
        pad_id,
        cfg.pack,
        t.seed,
        replay=replay,
        replay_fraction=cfg.replay_fraction,
    )
    teacher_loss = replay_teacher(model, cfg.replay_fraction, cfg.replay_loss, adapter)
    trainer = Trainer(
        model,
        t,
        source,
        loss_fn=make_loss_fn(model, cfg.l2sp, teacher_loss),
        eval_fn=held_out,
        tokenizer=tokenizer,
        out_dir=out_dir,
        extra_config={"sft": config_dict(cfg)},
    )
    if resume:
        trainer.resume()
    stopper = EarlyStopping(report["before"]["general_loss"], cfg.early_stop_rise, cfg.early_stop_patience)
    t_train, tokens_at_start = time.time(), trainer.tokens_seen  # a resumed run counts from its checkpoint
    final = trainer.fit(
        on_eval=stopper.on_eval,
        should_stop=stopper.should_stop,
        save_final=(lambda: save_policy(model, tokenizer, out_dir, adapter=True, base=cfg.base))
        if cfg.peft in ("lora", "qlora")
        else (lambda: save_peft(model, out_dir, adapter_base_path(cfg.base)))
        if adapter
        else None,
    )
    train_seconds = time.time() - t_train
    report["train"] = {
        "steps": trainer.step,
        "early_stopped_at": stopper.stopped_at,
        "seconds": train_seconds,
        "tokens_per_s": (trainer.tokens_seen - tokens_at_start) / max(train_seconds, 1e-9),
        "final_train_loss": final.get("loss"),
    }
    report["after"] = measure(bool(cfg.task_eval_per_task))
    b, a = report["before"]["general_loss"], report["after"]["general_loss"]
    report["general_loss_rise_pct"] = 100.0 * (a - b) / b if b and math.isfinite(b) else None
    rise = report["general_loss_rise_pct"]
    report["forgetting_flagged"] = rise is not None and rise > cfg.forget_warn_pct
    report["forget_warn_pct"] = cfg.forget_warn_pct
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["seconds"] = time.time() - t_start
    write_report(out_dir / "sft_report.json", report)
    return report


def format_sft_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`run_sft`'s report."""

    f = format_value

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
    ex = report["examples"]
    lines.insert(
        1,
        f"  data: {ex.get('records', 0)} records, {ex.get('skipped_invalid', 0)} skipped as invalid, "
        f"{ex.get('duplicates', 0)} duplicate prompts removed, {ex.get('truncated', 0)} truncated, "
        f"{ex.get('dropped_too_long', 0)} dropped as too long",
    )
    if report.get("forgetting_flagged"):
        lines.append(
            f"  WARNING: forgetting: the general-text loss rose {report['general_loss_rise_pct']:.1f}% (more than "
            f"{report['forget_warn_pct']:g}%); try replay_fraction=0.2 replay_loss=kd, l2sp=1e-3, a lower lr or "
            "early_stop_patience=2"
        )
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
