"""``llmlab medusa``: train Medusa heads (:mod:`llmlab.medusa.heads`) on a frozen base, through the Trainer.

- **Data.** ``data="self"`` (the default): the base's own answers to shipped Alpaca training prompts,
  generated through the engine (self-distillation: the heads learn what *this* model will write, which is
  what they must draft). ``alpaca``/``gsm8k``/``math``: the shipped SFT conversations, chat-rendered,
  answer tokens only. Anything else: a bundled corpus name or a text/JSONL file (every token).
- **Cached hidden states.** The base is frozen, so its final-norm hidden states at the trained positions are
  computed once (:func:`llmlab.medusa.data.collect_hidden`) and kept in ``cache_dir/hidden_*.pt`` (as the
  answers are in ``cache_dir/self_answers_*.jsonl``, in blocks of :data:`ANSWER_BLOCK` prompts; the output
  directory unless ``cache_dir`` is set): a rerun with more steps or another learning rate, given the same
  ``cache_dir``, starts training at once. Each step only runs the heads and the fused LM-head
  cross-entropy of :func:`llmlab.medusa.loss.medusa_loss`, so thousands of steps take minutes on a CPU.
- **Held-out measure.** The base's greedy answers to the last ``heldout`` Alpaca prompts (never trained on):
  each head's top-1 and top-5 accuracy and the chain acceptance length a greedy Medusa decode would get
  there, before training, every ``eval_every`` steps (the report's ``curve``) and after; then a real greedy speculative decode on a few of those prompts through the engine
  (acceptance length, output identical to the base alone).

``run_medusa(cfg, out)`` writes ``out/medusa_config.json``, ``out/medusa_heads.safetensors`` and
``out/medusa_report.json``; decode with ``LLM(base, speculative={"method": "medusa", "heads": out})``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.config import build_config
from llmlab.distill.data import alpaca_split, answer_examples, chat_examples, corpus_examples, teacher_answers
from llmlab.errors import ConfigError
from llmlab.infer import LLM, SamplingParams
from llmlab.losses import LossOutput
from llmlab.medusa.data import HiddenBatchSource, HiddenSet, cached_hidden
from llmlab.medusa.heads import MedusaHeads, heads_for, save_heads
from llmlab.medusa.loss import chain_scores, medusa_loss, topk_hits
from llmlab.recipes.common import load_base
from llmlab.sft.chat import prompt_ids
from llmlab.sft.datasets import NAMED_DATA, load_conversations
from llmlab.train import Trainer
from llmlab.train.config import TrainConfig
from llmlab.train.logging import config_dict, write_report

REPORT_FILE = "medusa_report.json"
ANSWER_BLOCK = (
    128  # self-generated answers are cached per block of prompts: a larger max_examples reuses them
)


@dataclass
class MedusaTrainConfig:
    base: str = "smollm2"  # llmlab checkpoint dir, HF dir, .gguf file, or "smollm2"
    heads: int = 4  # K: extra decoding heads (head k predicts the token k past the next one)
    layers: int = 1  # residual blocks per head
    share_lm_head: bool = True  # False: a trainable copy of the LM head per head (Medusa-1's layout)
    decay: float = 0.8  # loss weight of head k is decay^(k-1)
    # "seen": the softmax runs over the tokens the training targets contain (10x+ faster on a CPU: the
    # LM-head matmul is nearly all of a step); "all": over the whole vocabulary. Evaluation is always full.
    train_vocab: str = "seen"
    data: str = "self"  # "self" | "alpaca" | "gsm8k" | "math" | a corpus name | a text/JSONL file
    max_examples: int = 256  # prompts answered (self), conversations, or corpus documents
    max_len: int = 384  # tokens per example
    response_tokens: int = 128  # max new tokens per self-generated answer
    response_temperature: float = 0.0  # 0: the base's greedy answers (what greedy decoding will see)
    response_dtype: str = "bf16"  # the base copy that answers: bf16 (~2x faster on CPU) or fp32
    response_batch: int = 32
    heldout: int = 100  # the last N Alpaca records: never trained on; evaluation prompts
    eval_examples: int = 16  # held-out prompts whose greedy answers measure the heads
    accept_prompts: int = 4  # after training: greedy Medusa decoding through the engine (0: skip)
    accept_tokens: int = 64
    # where the self-generated answers and the hidden states are cached (None: the output directory, which
    # --overwrite empties); reruns given the same directory skip generation and the base's forwards
    cache_dir: str | None = None
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            lr=1e-3,
            min_lr=1e-4,
            weight_decay=0.0,
            warmup_steps=20,
            max_steps=300,
            batch_size=256,
            eval_every=0,
            log_every=10,
            tensorboard=False,
            plot=False,
        )  # fmt: skip
    )

    def validate(self) -> None:
        for name in ("heads", "layers", "max_examples", "response_tokens", "response_batch", "accept_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}' must be positive, got {getattr(self, name)}")
        if not 0 < self.decay <= 1:
            raise ConfigError(f"config key 'decay' must be in (0, 1], got {self.decay}")
        if self.max_len < 3:
            raise ConfigError(f"config key 'max_len' must be at least 3, got {self.max_len}")
        if self.train_vocab not in ("seen", "all"):
            raise ConfigError(f"config key 'train_vocab' must be seen or all, got {self.train_vocab!r}")
        if self.response_dtype not in ("bf16", "fp32"):
            raise ConfigError(
                f"config key 'response_dtype' must be bf16 or fp32, got {self.response_dtype!r}"
            )
        if not 1 <= self.eval_examples <= self.heldout or not 0 <= self.accept_prompts <= self.heldout:
            raise ConfigError("need 1 <= eval_examples <= heldout and 0 <= accept_prompts <= heldout")


MEDUSA_PRESETS: dict[str, MedusaTrainConfig] = {
    # SmolLM2-135M-Instruct, 4 heads sharing its LM head, on its own greedy answers to 256 Alpaca prompts.
    "smollm2-medusa": MedusaTrainConfig(),
}


def load_medusa_config(
    preset: str | None = None, yaml_path: str | None = None, overrides: list[str] | None = None
) -> MedusaTrainConfig:
    """Preset, then YAML, then ``key=value`` overrides (bare ``max_steps`` is ``train.max_steps``)."""
    return build_config(MedusaTrainConfig, MEDUSA_PRESETS, preset, yaml_path, overrides, {})


# --------------------------------------------------------------------------------- loss for the Trainer
def restrict_vocab(data: HiddenSet) -> tuple[HiddenSet, Tensor]:
    """``data`` with its labels renumbered into the set of token ids they contain, and those ids (sorted):
    training over ``W[ids]`` is a softmax over the tokens the targets use (a sampled-softmax shortcut)."""
    labels = data.labels
    ids = torch.unique(labels[labels != -100])
    remap = torch.full((int(ids.max()) + 1,), -100, dtype=torch.long)
    remap[ids] = torch.arange(len(ids))
    new = torch.where(labels != -100, remap[labels.clamp(min=0)], labels)
    return HiddenSet(data.hidden, new), ids


def make_medusa_loss_fn(
    lm_head_weight: Tensor, decay: float, vocab_ids: Tensor | None = None
) -> Callable[[nn.Module, dict], LossOutput]:
    """``loss_fn(heads, batch)``: :func:`medusa_loss` over a batch of cached hidden states (with
    ``vocab_ids``: over those rows of the projections only, the labels numbered into them); metrics
    ``ce1..ceK`` (each head's cross-entropy per trained position)."""

    def loss_fn(heads: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        labels = batch["labels"]
        states = heads.states(batch["hidden"])
        weights = heads.projections(lm_head_weight)
        if vocab_ids is not None:
            weights = [w[vocab_ids.to(w.device)] for w in weights]
        total, per_head = medusa_loss(states, weights, labels, decay)
        counts = (labels != -100).sum(0).clamp(min=1)
        weight = float((labels[:, 0] != -100).sum())
        # The trainer averages metrics weighted by ``weight``: scale each head's mean back up by it.
        metrics = {f"ce{k + 1}": float(ce) / float(counts[k]) for k, ce in enumerate(per_head)}
        return LossOutput(total, weight, metrics)

    return loss_fn


def heads_scores(heads: MedusaHeads, lm_head_weight: Tensor, data: HiddenSet, chunk: int = 256) -> dict:
    """Each head's top-1 and top-5 accuracy and the greedy chain acceptance length (:func:`chain_scores`)
    on ``data``."""
    hits1, hits5, totals, accepted = 0, 0, 0, []
    with torch.no_grad():
        for s in range(0, len(data), chunk):
            h = data.hidden[s : s + chunk].to(lm_head_weight.device)
            labels = data.labels[s : s + chunk].to(lm_head_weight.device)
            logits = heads(h, lambda x: F.linear(x, lm_head_weight.to(x.dtype)))
            _, acc = chain_scores(logits, labels)
            h1, n = topk_hits(logits, labels, 1)
            h5, _ = topk_hits(logits, labels, 5)
            hits1, hits5, totals = hits1 + h1, hits5 + h5, totals + n
            accepted.append(acc)
    n = totals.clamp(min=1)
    out = {f"top1_{k + 1}": v for k, v in enumerate((hits1 / n).tolist())}
    out.update({f"top5_{k + 1}": v for k, v in enumerate((hits5 / n).tolist())})
    out["accept_len"] = 1.0 + float(torch.cat(accepted).float().mean())
    return out


# --------------------------------------------------------------------------------------------- the run
def _examples(cfg: MedusaTrainConfig, model: nn.Module, tok: Any, cache: Path) -> tuple[list, float]:
    """Training examples for ``cfg.data`` and the seconds spent generating them."""
    if cfg.data == "self":
        train_convs, _ = alpaca_split(cfg.heldout)
        prompts = _fitting(model, tok, train_convs)[: cfg.max_examples]
        records, seconds = [], 0.0
        for start in range(0, len(prompts), ANSWER_BLOCK):
            block, block_seconds = teacher_answers(
                model, tok, prompts[start : start + ANSWER_BLOCK], cfg.response_tokens,
                cfg.response_temperature, cfg.response_dtype, cfg.response_batch, cfg.train.seed + start,
                cache=cache / f"self_answers_{start:05d}.jsonl",
            )  # fmt: skip
            records += block
            seconds += block_seconds
        return answer_examples(records, cfg.max_len, "assistant"), seconds
    if cfg.data in NAMED_DATA:
        convs = alpaca_split(cfg.heldout)[0] if cfg.data == "alpaca" else load_conversations(cfg.data)
        return chat_examples(tok, convs[: cfg.max_examples], cfg.max_len, "assistant"), 0.0
    return corpus_examples(tok, cfg.data, cfg.max_len, cfg.max_examples), 0.0


def _fitting(model: nn.Module, tok: Any, convs: list) -> list:
    """The prompts (messages without the answer) that leave the model's context room for an answer."""
    prompts = [c.messages[:-1] for c in convs]
    return [m for m in prompts if len(prompt_ids(tok, m)) < model.cfg.max_seq_len // 2]


def speculative_check(model: nn.Module, tok: Any, heads: MedusaHeads, prompts: list, tokens: int) -> dict:
    """Greedy decoding of ``prompts`` with the heads through the engine: acceptance, identical output."""
    sp = SamplingParams(max_tokens=tokens)
    plain = LLM.from_model(model, tok, max_batch_size=len(prompts)).generate(prompts, sp)
    spec = LLM.from_model(model, tok, max_batch_size=len(prompts),
                          speculative={"method": "medusa", "heads": heads, "num_tokens": heads.num_heads})  # fmt: skip
    outs = spec.generate(prompts, sp)
    stats = spec.stats
    return {
        "identical_to_base": all(a.token_ids == b.token_ids for a, b in zip(plain, outs, strict=True)),
        "acceptance_rate": stats["spec_acceptance_rate"],
        "mean_accepted_len": stats["spec_mean_accepted_len"],
        "tokens": sum(len(o.token_ids) for o in outs),
    }


def run_medusa(cfg: MedusaTrainConfig, out_dir: str | Path) -> dict[str, Any]:
    """The whole run (see the module docstring); returns and writes the report."""
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.manual_seed(cfg.train.seed)
    model, tok = load_base(cfg.base, "Medusa training renders prompts and text with it")
    model = model.float().eval().requires_grad_(False)
    head_w = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight

    cache = Path(cfg.cache_dir) if cfg.cache_dir else out_dir
    train_ex, gen_seconds = _examples(cfg, model, tok, cache)
    _, held = alpaca_split(cfg.heldout)
    held_prompts = _fitting(model, tok, held)[: cfg.eval_examples]
    eval_records, _ = teacher_answers(
        model, tok, held_prompts, cfg.response_tokens, batch=cfg.response_batch,
        cache=cache / "eval_answers.jsonl",
    )  # fmt: skip
    t_hidden = time.time()
    train_set = cached_hidden(model, train_ex, cfg.heads, cache / "hidden_train.pt", cfg.base)
    eval_ex = answer_examples(eval_records, cfg.max_len, "assistant")
    eval_set = cached_hidden(model, eval_ex, cfg.heads, cache / "hidden_eval.pt", cfg.base)
    hidden_seconds = time.time() - t_hidden

    heads = heads_for(model, cfg.heads, cfg.layers, cfg.share_lm_head, base_model=cfg.base)
    vocab_ids = None
    if cfg.train_vocab == "seen":
        train_set, vocab_ids = restrict_vocab(train_set)
    trainer = Trainer(
        heads,
        cfg.train,
        HiddenBatchSource(train_set, cfg.train.batch_size, cfg.train.seed),
        loss_fn=make_medusa_loss_fn(head_w, cfg.decay, vocab_ids),
        eval_fn=lambda m: heads_scores(m, head_w, eval_set),
        extra_config={"medusa": config_dict(cfg)},
    )
    report: dict[str, Any] = {
        "base": cfg.base,
        "heads": cfg.heads,
        "trainable_params": sum(p.numel() for p in heads.parameters() if p.requires_grad),
        "data": {
            "source": cfg.data,
            "examples": len(train_ex),
            "train_positions": len(train_set),
            "eval_positions": len(eval_set),
            "train_vocab": len(vocab_ids) if vocab_ids is not None else model.cfg.vocab_size,
            "generation_seconds": gen_seconds,
            "hidden_state_seconds": hidden_seconds,
        },
        "before": trainer.evaluate(),
    }
    t_train = time.time()
    curve: list[dict[str, float]] = [{"step": 0, **report["before"]}]
    final = trainer.fit(on_eval=lambda m: curve.append({"step": trainer.step, **m}))
    report["curve"] = curve
    report["train"] = {
        "steps": trainer.step,
        "positions": trainer.step * cfg.train.batch_size * cfg.train.grad_accum_steps,
        "seconds": time.time() - t_train,
        "final_train_loss": final.get("loss"),
    }
    heads.eval().requires_grad_(False)
    after = {k[len("val_") :]: v for k, v in final.items() if k.startswith("val_")}
    report["after"] = after if "accept_len" in after else trainer.evaluate()
    save_heads(heads, out_dir)
    if cfg.accept_prompts:
        report["speculative"] = speculative_check(
            model, tok, heads, held_prompts[: cfg.accept_prompts], cfg.accept_tokens
        )
    report["seconds"] = time.time() - t_start
    write_report(out_dir / REPORT_FILE, report)
    return report


def format_medusa_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`run_medusa`'s report."""

    def line(scores: dict[str, float]) -> str:
        top1 = " ".join(f"{scores[k]:.3f}" for k in sorted(scores) if k.startswith("top1_"))
        top5 = " ".join(f"{scores[k]:.3f}" for k in sorted(scores) if k.startswith("top5_"))
        top5 = f", top-5 {top5}" if top5 else ""
        return f"top-1 per head {top1}{top5}; greedy chain acceptance length {scores['accept_len']:.2f}"

    d, t = report["data"], report["train"]
    lines = [
        f"Medusa heads: {report['heads']} on {report['base']} ({report['trainable_params']:,} trainable)",
        f"data: {d['source']}, {d['examples']} examples, {d['train_positions']} positions "
        f"(generation {d['generation_seconds']:.0f} s, hidden states {d['hidden_state_seconds']:.0f} s)",
        f"train: {t['steps']} steps, {t['seconds']:.0f} s, final loss {t['final_train_loss']:.3f}",
        f"held-out before: {line(report['before'])}",
        *(f"held-out at step {c['step']}: {line(c)}" for c in report.get("curve", [])[1:-1]),
        f"held-out after:  {line(report['after'])}",
    ]
    spec = report.get("speculative")
    if spec:
        lines.append(
            f"engine check: mean accepted length {spec['mean_accepted_len']:.2f}, acceptance "
            f"{spec['acceptance_rate']:.3f}, output identical to the base: {spec['identical_to_base']}"
        )
    return "\n".join(lines)
