"""Training data for Medusa heads: the frozen base's hidden states, computed once, and the head targets.

The base never changes during head training, so its final-norm hidden state at every trained position is
computed in one no-grad pass (``return_hidden``: the LM head is not run) and kept as a ``[N, D]`` float32
table beside the ``[N, K]`` targets ``x_{t+1+k}``. A training step is then only the heads and the LM-head
cross-entropy, which makes a CPU run minutes instead of hours.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.errors import DataError
from llmlab.losses.fused_ce import IGNORE_INDEX
from llmlab.sft.chat import TokenizedChat


@dataclass
class HiddenSet:
    hidden: Tensor  # [N, D] float32: the base's final-norm hidden state at each kept position
    labels: Tensor  # [N, K] int64: x_{t+1+k} for head k = 1..K, -100 where there is none

    def __len__(self) -> int:
        return self.hidden.shape[0]


def head_targets(ids: Sequence[int], counted: Sequence[bool], num_heads: int) -> tuple[list[int], Tensor]:
    """Positions ``t`` to train on and their targets ``[len(positions), K]``.

    Head ``k`` at ``t`` targets ``ids[t+1+k]``, if that token exists and is ``counted`` (e.g. an answer
    token); a position is kept when head 1's target is counted.
    """
    T = len(ids)
    positions = [t for t in range(T - 2) if counted[t + 2]]
    labels = torch.full((len(positions), num_heads), IGNORE_INDEX, dtype=torch.long)
    for row, t in enumerate(positions):
        for k in range(num_heads):
            j = t + 2 + k
            if j < T and counted[j]:
                labels[row, k] = ids[j]
    return positions, labels


@torch.no_grad()
def collect_hidden(model: nn.Module, examples: Sequence[TokenizedChat], num_heads: int) -> HiddenSet:
    """Run the frozen ``model`` over every example once and keep the hidden states of trained positions.

    An example's ``labels`` mark the tokens that count as targets (``-100``: not trained on, e.g. the prompt).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hidden, labels = [], []
    try:
        for ex in examples:
            counted = [lab != IGNORE_INDEX for lab in ex.labels]
            positions, targets = head_targets(ex.input_ids, counted, num_heads)
            if not positions:
                continue
            ids = torch.tensor([ex.input_ids], device=device)
            h = model(ids, return_hidden=True)[0]
            hidden.append(h[positions].float().cpu())
            labels.append(targets)
    finally:
        model.train(was_training)
    if not hidden:
        raise DataError("no training positions: every example is shorter than 3 tokens or has no target")
    return HiddenSet(torch.cat(hidden), torch.cat(labels))


def examples_key(examples: Sequence[TokenizedChat], num_heads: int, base: str) -> str:
    """A fingerprint of what :func:`collect_hidden` computes from: the base, the heads count, every token."""
    h = hashlib.sha256(json.dumps([base, num_heads]).encode())
    for ex in examples:
        h.update(json.dumps([list(ex.input_ids), list(ex.labels)]).encode())
    return h.hexdigest()


def cached_hidden(
    model: nn.Module, examples: Sequence[TokenizedChat], num_heads: int, path: Path, base: str
) -> HiddenSet:
    """:func:`collect_hidden`, kept in ``path`` (a ``torch.save`` file with the examples' fingerprint): a
    rerun on the same base and examples (more steps, another learning rate) skips the base's forwards."""
    key = examples_key(examples, num_heads, base)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            return HiddenSet(saved["hidden"], saved["labels"])
    data = collect_hidden(model, examples, num_heads)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "hidden": data.hidden, "labels": data.labels}, path)
    return data


class HiddenBatchSource:
    """Shuffled batches of ``batch_size`` rows of a :class:`HiddenSet`, epoch after epoch (a Trainer
    ``BatchSource``: ``next_batch``, ``state_dict``, ``load_state_dict``)."""

    def __init__(self, data: HiddenSet, batch_size: int, seed: int = 0):
        self.data = data
        self.batch_size = min(batch_size, len(data))
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._perm()

    def _perm(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.data), generator=g)

    def next_batch(self) -> dict[str, Tensor]:
        if self.pos + self.batch_size > len(self.data):
            self.epoch += 1
            self.pos = 0
            self._order = self._perm()
        idx = self._order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return {"hidden": self.data.hidden[idx], "labels": self.data.labels[idx]}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()
