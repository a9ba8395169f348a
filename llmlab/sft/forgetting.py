"""Measuring and limiting forgetting during SFT: held-out pretraining text (the general-text loss), replay
rows of pretraining text mixed into SFT batches (plain next-token loss, or KL to the frozen base: learning
without forgetting), the L2-SP pull toward the pretrained weights, and freezing layers.

The SFT recipe (:mod:`llmlab.recipes.sft`) turns these on from its config.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmlab.data.corpora import load_corpus
from llmlab.errors import ConfigError
from llmlab.losses import MODEL_KWARGS, LossOutput, causal_lm_loss, kd_loss
from llmlab.model.lora import disable_adapter, lora_layers


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


def general_text_batches(
    tokenizer: Any, corpus: str, n_tokens: int, seq_len: int, batch_size: int
) -> list[dict]:
    """Fixed rows of held-out pretraining text (the last documents of ``corpus``) for the forgetting metric."""
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
    docs = load_corpus(corpus)
    ids: list[int] = []
    for doc in docs[: max(1, int(len(docs) * 0.8))]:
        ids += tokenizer.encode(doc) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        if len(ids) >= max_tokens:
            break
    return np.asarray(ids, dtype=np.int64)


# ----------------------------------------------------------------------------------------- losses
def replay_teacher(model: Any, replay_fraction: float, replay_loss: str, adapter: bool):
    """The replay-KD loss over a frozen copy of the base (``adapter``: the same model with its LoRA adapter
    off), or None when replay rows use plain next-token loss."""
    if replay_fraction <= 0 or replay_loss != "kd":
        return None
    if adapter:

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
    lm_loss = base_loss or causal_lm_loss
    if l2sp <= 0:
        return lm_loss
    loras = [m for _, m in lora_layers(model)]
    anchors = {} if loras else {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = dict(model.named_parameters())

    def loss_fn(m: Any, batch: dict) -> LossOutput:
        out = lm_loss(m, batch)
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


class EarlyStopping:
    """Stop when the general-text loss is more than ``rise`` (relative) above the base's for ``patience``
    evaluations in a row (``patience`` 0: never). Hand :meth:`on_eval` and :meth:`should_stop` to
    ``Trainer.fit``; ``stopped_at`` is the step it stopped at, or None."""

    def __init__(self, base_loss: float, rise: float, patience: int):
        self.limit = base_loss * (1 + rise)
        self.patience = patience
        self.bad_evals = 0
        self.stopped_at: int | None = None

    def on_eval(self, metrics: dict[str, float]) -> None:
        self.bad_evals = self.bad_evals + 1 if metrics["general_loss"] > self.limit else 0

    def should_stop(self, step: int) -> bool:
        if self.patience and self.bad_evals >= self.patience:
            self.stopped_at = step
            return True
        return False
