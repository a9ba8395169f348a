"""Knowledge distillation of a small student from a teacher's logits, through the shared Trainer.

The main use is a **draft model for speculative decoding** (:mod:`llmlab.infer.speculative`): the draft must
share the target's tokenizer, be much cheaper per token, and propose what the target would emit. So:

- **The student is a shallow copy of the teacher.** Same width, heads and vocabulary; its embedding (tied
  output head) and final norm are copied from the teacher and, by default, frozen, and its blocks are copies
  of the teacher blocks listed in ``student_layers`` (layer dropping, as DistilBERT initialises from every
  other BERT layer). Sharing the teacher's head means the student only has to learn to put its last hidden
  state where the teacher's would be, which a short CPU run can do; training from random weights could not.
- **The loss is the teacher's whole next-token distribution,** not only the sampled token (:func:`kd_loss`,
  Hinton et al. 2015): forward KL from the teacher's softened distribution to the student's, times T²,
  optionally mixed with the usual cross-entropy on the data's tokens. Teacher logits are computed on the
  fly, under ``no_grad`` and the trainer's bf16 autocast; nothing is stored.
- **The data is what the target will be asked to continue:** chat-rendered Alpaca conversations (the shipped
  SFT set) and, with ``teacher_responses=N``, the teacher's own answers to N Alpaca prompts -- its output
  distribution, which is exactly what a draft has to predict. A bundled pretraining corpus works too.
  The last ``heldout`` Alpaca records are never trained on: evaluation and ``bench/speculative.py`` use them.

``run_distill(cfg, out)`` measures the student before and after (KL to the teacher and top-1 agreement on
the teacher's own greedy answers to held-out prompts, answer tokens only: the rate at which greedy
speculative decoding accepts a first draft token), trains, checks greedy speculative decoding with the
student as draft on held-out prompts (acceptance rate, output identical to the teacher alone), and writes
``out/final`` (an llmlab checkpoint with the teacher's tokenizer) and ``out/distill_report.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.config import build_config
from llmlab.distill.data import alpaca_split, answer_examples, chat_examples, corpus_examples, teacher_answers
from llmlab.distill.student import spaced_layers, speculative_check, student_from_teacher
from llmlab.errors import ConfigError
from llmlab.losses import MODEL_KWARGS, LossFn, LossOutput, kd_loss
from llmlab.recipes.common import distill_train_config, format_value, load_base
from llmlab.sft.chat import TokenizedChat
from llmlab.sft.datasets import SFTBatchSource, iterate_examples
from llmlab.train import Trainer
from llmlab.train.config import TrainConfig
from llmlab.train.evaluation import evaluate_loss
from llmlab.train.logging import config_dict, write_report

KD_ON = ("all", "assistant")


# ------------------------------------------------------------------------------------------ the config
@dataclass
class DistillConfig:
    teacher: str = "smollm2"  # llmlab checkpoint dir, HF dir, .gguf file, or "smollm2"
    # Teacher blocks copied into the student, in order; empty: ``student_depth`` evenly spaced blocks, the
    # first and the last included.
    student_layers: list[int] = field(default_factory=list)
    student_depth: int = 4
    freeze_embeddings: bool = True  # keep the copied (tied) embedding/head: the student shares its space
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the hard-label cross-entropy mixed into the KD loss
    kd_on: str = "all"  # which positions count: "all" tokens or "assistant" tokens only
    # data
    data: str = "alpaca"  # "alpaca" (shipped SFT set, chat-rendered) or a corpus name/path (data/corpora.py)
    max_examples: int | None = None  # cap on Alpaca references / corpus documents (0: teacher answers only)
    max_len: int = 256  # tokens per example (longer ones are cut on the right)
    heldout: int = 100  # the last N Alpaca records: never trained on; evaluation and bench prompts
    eval_examples: int = 32  # held-out prompts whose teacher answers measure KL / top-1 agreement
    teacher_responses: int = 0  # Alpaca training prompts answered by the teacher and added to the data
    response_tokens: int = 128  # max new tokens per teacher answer
    response_temperature: float = 0.0  # 0: the teacher's greedy answers (what greedy decoding will see)
    response_dtype: str = "bf16"  # the teacher copy that answers: bf16 (~2x faster on CPU) or fp32
    response_batch: int = 32  # requests the teacher decodes at once (continuous batching)
    # after training: greedy speculative decoding with the student as draft, on held-out prompts
    accept_prompts: int = 4  # 0: skip
    accept_tokens: int = 64
    accept_k: int = 4
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if not self.student_layers and self.student_depth < 1:
            raise ConfigError("config key 'student_depth' must be positive")
        if any(i < 0 for i in self.student_layers):
            raise ConfigError(f"config key 'student_layers' has a negative index: {self.student_layers}")
        if self.temperature <= 0:
            raise ConfigError(f"config key 'temperature' must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"config key 'alpha' must be in [0, 1], got {self.alpha}")
        if self.response_dtype not in ("bf16", "fp32"):
            raise ConfigError(
                f"config key 'response_dtype' must be bf16 or fp32, got {self.response_dtype!r}"
            )
        if self.kd_on not in KD_ON:
            raise ConfigError(f"config key 'kd_on' must be one of {list(KD_ON)}, got {self.kd_on!r}")
        if self.max_len < 2 or self.max_len - 1 > self.train.seq_len:
            raise ConfigError(
                f"config key 'max_len' ({self.max_len}) must be >= 2 and at most train.seq_len + 1 "
                f"({self.train.seq_len + 1})"
            )
        if self.heldout < 1 or self.eval_examples < 1 or self.eval_examples > self.heldout:
            raise ConfigError("need 1 <= eval_examples <= heldout")
        if self.accept_prompts > self.heldout:
            raise ConfigError("config key 'accept_prompts' must be at most 'heldout'")
        for name in ("teacher_responses", "accept_prompts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{name}' must be >= 0")
        for name in ("response_tokens", "response_batch", "accept_tokens", "accept_k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{name}' must be positive")


DISTILL_PRESETS: dict[str, DistillConfig] = {
    # A 4-block draft for SmolLM2-135M-Instruct in about 14 minutes on one CPU core: ~4 to have the teacher
    # answer 640 Alpaca prompts (bf16), ~9 to train 210 x 1024 tokens on those answers and 640 Alpaca
    # references, KD on answer tokens only (results and the block choices tried: BENCHMARKS.md, "Preset run
    # histories").
    "smollm2-draft": DistillConfig(
        teacher="smollm2",
        student_layers=[0, 10, 20, 29],
        kd_on="assistant",
        max_examples=640,
        teacher_responses=640,
        train=distill_train_config(
            lr=2e-3, max_steps=210, batch_size=4, seq_len=256, eval_every=50, save_every=50
        ),
    ),
}


def load_distill_config(
    preset: str | None = None, yaml_path: str | None = None, overrides: list[str] | None = None
) -> DistillConfig:
    """Preset, then YAML, then ``key=value`` overrides (bare ``max_steps`` is ``train.max_steps``; ``base``
    is ``teacher``)."""
    return build_config(DistillConfig, DISTILL_PRESETS, preset, yaml_path, overrides, {"base": "teacher"})


# --------------------------------------------------------------------------------- loss for the Trainer
def make_kd_loss_fn(teacher: nn.Module, temperature: float, alpha: float) -> LossFn:
    """``loss_fn(student, batch)`` for the Trainer: the summed :func:`kd_loss` over positions with a label.

    The teacher runs under ``no_grad`` inside the trainer's autocast (bf16 on CPU and GPU). Metrics: ``kl``
    (at the training temperature) and ``top1`` (student argmax == teacher argmax, what greedy speculative
    decoding accepts), both per counted position.
    """

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
        mask = batch["labels"] != -100
        with torch.no_grad():
            t_logits = teacher(batch["input_ids"], **kwargs)
        s_logits = model(batch["input_ids"], **kwargs)
        per_pos = kd_loss(s_logits, t_logits, temperature, mask, batch["labels"], alpha)
        with torch.no_grad():
            weight = float(mask.sum())
            top1 = float(((s_logits.argmax(-1) == t_logits.argmax(-1)) & mask).sum()) / max(weight, 1.0)
            kl = per_pos if alpha == 0 else kd_loss(s_logits, t_logits, temperature, mask)
            metrics = {"kl": float(kl.sum()) / max(weight, 1.0), "top1": top1}
        return LossOutput(per_pos.sum(), weight, metrics)

    return loss_fn


def kd_eval_fn(
    teacher: nn.Module, batches: list[dict[str, Tensor]]
) -> Callable[[nn.Module], dict[str, float]]:
    """Mean KL(teacher ‖ student) at T = 1 and top-1 agreement over fixed held-out batches."""
    loss_fn = make_kd_loss_fn(teacher, 1.0, 0.0)

    def eval_fn(model: nn.Module) -> dict[str, float]:
        metrics = evaluate_loss(model, batches, loss_fn)
        return {"kl": metrics["kl"], "top1": metrics["top1"]}

    return eval_fn


# --------------------------------------------------------------------------------------------- the run
def run_distill(cfg: DistillConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """The whole distillation run (see the module docstring); returns and writes the report."""
    cfg.validate()
    out_dir = Path(out_dir)
    t_start = time.time()
    torch.manual_seed(cfg.train.seed)
    teacher, tokenizer = load_base(cfg.teacher, "the student must share the teacher's", cfg.train.seq_len)
    teacher = teacher.float().eval().requires_grad_(False)
    layers = list(cfg.student_layers) or spaced_layers(teacher.cfg.n_layers, cfg.student_depth)
    student = student_from_teacher(teacher, layers)
    if cfg.freeze_embeddings:
        student.embed_tokens.weight.requires_grad_(False)

    # ---- data
    train_convs, held = alpaca_split(cfg.heldout)
    train_ex: list[TokenizedChat] = []
    if cfg.data == "alpaca":
        if cfg.max_examples != 0:
            train_ex = chat_examples(tokenizer, train_convs[: cfg.max_examples], cfg.max_len, cfg.kd_on)
    else:
        train_ex = corpus_examples(tokenizer, cfg.data, cfg.max_len, cfg.max_examples)
    gen_seconds, gen_tokens = 0.0, 0
    if cfg.teacher_responses:
        records, gen_seconds = teacher_answers(
            teacher,
            tokenizer,
            [c.messages[:-1] for c in train_convs[: cfg.teacher_responses]],
            cfg.response_tokens,
            cfg.response_temperature,
            cfg.response_dtype,
            cfg.response_batch,
            cfg.train.seed,
            cache=out_dir / "teacher_responses.jsonl",
        )
        gen_tokens = sum(len(r["answer"]) for r in records)
        train_ex = train_ex + answer_examples(records, cfg.max_len, cfg.kd_on)
    if not train_ex:
        raise ConfigError("no training data: max_examples=0 needs teacher_responses > 0")
    # Held-out evaluation on the teacher's own fp32 greedy answers, answer positions only: there, top-1
    # agreement is the rate at which greedy speculative decoding accepts the student's first draft token.
    # (Template and prompt tokens would inflate it: the fixed system prompt is easy to predict.)
    eval_records, _ = teacher_answers(
        teacher,
        tokenizer,
        [c.messages[:-1] for c in held[: cfg.eval_examples]],
        cfg.response_tokens,
        batch=cfg.response_batch,
        cache=out_dir / "eval_answers.jsonl",
    )
    eval_ex = answer_examples(eval_records, cfg.max_len, "assistant")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    seq_len = cfg.train.seq_len
    eval_batches = list(iterate_examples(eval_ex, cfg.train.batch_size, seq_len, pad_id))
    source = SFTBatchSource(train_ex, cfg.train.batch_size, seq_len, pad_id, seed=cfg.train.seed)

    trainer = Trainer(
        student,
        cfg.train,
        source,
        loss_fn=make_kd_loss_fn(teacher, cfg.temperature, cfg.alpha),
        eval_fn=kd_eval_fn(teacher, eval_batches),
        tokenizer=tokenizer,
        out_dir=out_dir,
        extra_config={"distill": config_dict(cfg)},
    )
    teacher.to(trainer.device)
    n_trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    report: dict[str, Any] = {
        "teacher": cfg.teacher,
        "teacher_params": teacher.num_params(),
        "student_params": student.num_params(),
        "student_params_non_embedding": student.num_params(exclude_embeddings=True),
        "student_trainable": n_trainable,
        "student_layers": layers,
        "data": {
            "source": cfg.data,
            "train_examples": len(train_ex),
            "train_tokens_available": sum(len(e.input_ids) for e in train_ex),
            "teacher_responses": cfg.teacher_responses,
            "teacher_response_tokens": gen_tokens,
            "teacher_response_seconds": gen_seconds,
            "eval_examples": len(eval_ex),
        },
        "before": trainer.evaluate(),  # the layer-dropped copy, untrained (logged as step 0)
    }
    if resume:
        trainer.resume()
    t_train = time.time()
    final = trainer.fit()
    train_seconds = time.time() - t_train
    report["train"] = {
        "steps": trainer.step,
        "tokens": trainer.tokens_seen,
        "seconds": train_seconds,
        "tokens_per_s": trainer.tokens_seen / max(train_seconds, 1e-9),
        "final_train_loss": final.get("loss"),
    }
    report["after"] = {"kl": final.get("val_kl"), "top1": final.get("val_top1")}
    if cfg.accept_prompts:
        student.eval()
        prompts = [c.messages[:-1] for c in held[: cfg.accept_prompts]]
        report["speculative"] = speculative_check(
            teacher.cpu(), student.cpu(), tokenizer, prompts, cfg.accept_k, cfg.accept_tokens
        )
    report["seconds"] = time.time() - t_start
    write_report(out_dir / "distill_report.json", report)
    return report


def format_distill_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`run_distill`'s report."""

    f = format_value

    b, a, t, d = report["before"], report["after"], report["train"], report["data"]
    lines = [
        f"student: {report['student_params'] / 1e6:.1f}M params ({report['student_params_non_embedding'] / 1e6:.1f}M "
        f"outside the embedding; {report['student_trainable'] / 1e6:.1f}M trained), teacher layers "
        f"{report['student_layers']} of a {report['teacher_params'] / 1e6:.1f}M-param teacher",
        f"  data: {d['source']}, {d['train_examples']} examples"
        + (
            f" incl. {d['teacher_responses']} teacher answers ({d['teacher_response_tokens']:.0f} tokens, "
            f"{d['teacher_response_seconds']:.0f} s to generate)"
            if d["teacher_responses"]
            else ""
        ),
        f"  trained {t['steps']} steps, {t['tokens']:,} tokens in {t['seconds']:.0f} s ({t['tokens_per_s']:.0f} tok/s)",
        f"  on the teacher's answers to {d['eval_examples']} held-out prompts (answer tokens):",
        f"    KL(teacher||student) {f(b.get('kl'))} -> {f(a.get('kl'))}",
        f"    top-1 agreement      {f(b.get('top1'))} -> {f(a.get('top1'))}",
    ]
    if "speculative" in report:
        s = report["speculative"]
        lines.append(
            f"  greedy speculative decoding (k={s['k']}, {s['prompts']} held-out prompts, {s['tokens']} tokens): "
            f"acceptance {s['acceptance']:.3f}, {s['tokens_per_step']:.2f} tokens/step, "
            f"{s['seconds_target_alone'] / max(s['seconds_speculative'], 1e-9):.2f}x vs the teacher alone, "
            f"output identical: {s['identical']}"
        )
    return "\n".join(lines)
