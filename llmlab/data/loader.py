"""Token-shard format and the packed, deterministic pretraining loader.

A prepared dataset is a directory::

    meta.json     {"dtype": "uint16"|"uint32", "vocab_size": V, "splits": {"train": {...}, "val": {...}}}
    train.bin     flat token ids of all training documents, each followed by the eos id
    val.bin       the same for the held-out split

``meta.json``'s per-split entry records ``tokens``, ``documents`` and ``bytes`` (UTF-8 bytes of the text that
produced the tokens), so evaluation can turn a loss in nats/token into bits per byte.

The loader packs: a training sequence is any window of ``seq_len + 1`` consecutive tokens (documents are
separated by eos, as GPT-2 and nanoGPT do). Which windows make up global batch ``k`` depends only on
``(seed, k)``, never on the world size; each rank takes its own rows of the global batch. That makes a run
reproducible, resumable from the saved batch index, and resumable on a different number of processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from llmlab.errors import DataError

META_FILE = "meta.json"


class BatchSource(Protocol):
    """What the trainer pulls batches from. SFT / DPO / RM sources implement the same three methods."""

    def next_batch(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing; prepare the dataset with 'llmlab data prepare'")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc


def open_split(directory: str | Path, split: str) -> np.memmap:
    meta = read_meta(directory)
    path = Path(directory) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path}: missing split '{split}'")
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size % dtype.itemsize:
        raise DataError(f"{path}: size is not a multiple of {dtype.itemsize} bytes (truncated?)")
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class PackedLoader:
    """Random windows of ``seq_len + 1`` tokens; batch ``k`` of a run is a pure function of ``(seed, k)``.

    ``batch_size`` is the per-rank batch; the global batch is ``batch_size * world_size`` rows.
    """

    directory: str | Path
    split: str
    batch_size: int
    seq_len: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    step: int = 0  # global batches handed out so far

    def __post_init__(self) -> None:
        self.tokens = open_split(self.directory, self.split)
        if len(self.tokens) < self.seq_len + 2:
            raise DataError(
                f"{Path(self.directory) / (self.split + '.bin')}: only {len(self.tokens)} tokens, "
                f"fewer than one sequence of {self.seq_len + 1}"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _offsets(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.global_batch)

    def next_batch(self) -> dict[str, torch.Tensor]:
        offsets = self._offsets(self.step)[self.rank :: self.world_size]
        self.step += 1
        rows = np.stack([self.tokens[o : o + self.seq_len + 1].astype(np.int64) for o in offsets])
        data = torch.from_numpy(rows)
        return {"input_ids": data[:, :-1], "labels": data[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.seed = int(state.get("seed", self.seed))


def iterate_split(
    directory: str | Path, split: str, seq_len: int, batch_size: int, max_batches: int | None = None
):
    """Deterministic, non-overlapping pass over a split (for evaluation): yields ``input_ids``/``labels``."""
    tokens = open_split(directory, split)
    n_seq = (len(tokens) - 1) // seq_len
    if max_batches is not None:
        n_seq = min(n_seq, max_batches * batch_size)
    for start in range(0, n_seq, batch_size):
        idx = range(start, min(start + batch_size, n_seq))
        rows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1].astype(np.int64) for i in idx])
        data = torch.from_numpy(rows)
        yield {"input_ids": data[:, :-1], "labels": data[:, 1:]}
