"""SFT data: loaders and validators for the common record formats, tokenization, and batching.

Record formats (one JSON object per JSONL line, or a JSON list of objects; ``.gz`` is read transparently):

- Alpaca ``{"instruction", "input", "output"}``: user = instruction (+ blank line + input), assistant = output.
- Chat ``{"messages": [{"role", "content"}, ...]}`` with roles system/user/assistant, multi-turn.
- Prompt/completion ``{"prompt", "completion"}``.
- GSM8K ``{"question", "answer"}``.

A malformed record stops loading with ``file:line: reason``; with ``skip_invalid`` it is counted and skipped.

**Truncation policy** (``truncation``): a tokenized conversation longer than ``max_len`` tokens is

- ``"right"`` (default): cut to its first ``max_len`` tokens (the prompt is kept, the end of the answer is
  lost); if no assistant token is left the example is dropped and counted;
- ``"drop"``: dropped and counted;
- ``"off"``: an error naming the record's file:line.

**Batching.** With packing (default), whole conversations are laid end to end into rows of ``seq_len``
tokens; ``segment_ids`` isolate attention per conversation and ``positions`` restart at 0 for each, so a
packed row computes exactly what the conversations would compute alone. Without packing each row holds one
conversation, right-padded (``attention_mask`` 0, label -100). Batch ``k`` is a pure function of
``(seed, k)``, as in the pretraining loader, so runs resume exactly.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.errors import DataError
from llmlab.sft.chat import IGNORE_INDEX, TokenizedChat, tokenize_chat, validate_messages

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "sft"
# Shipped data sets by name (see llmlab/assets/sft/SOURCES.md for origin and licence).
NAMED_DATA = {
    "alpaca": ASSETS / "alpaca_5000.json.gz",
    "gsm8k": ASSETS / "gsm8k_train.jsonl.gz",
    "math": ASSETS / "llm_adapters_math_data.json.gz",
}
TRUNCATIONS = ("right", "drop", "off")


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    where: str  # "file:line" of the record it came from


@dataclass
class LoadStats:
    records: int = 0
    skipped_invalid: int = 0
    duplicates: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    errors: list[str] = field(default_factory=list)  # first few skip reasons


# --------------------------------------------------------------------------------------- reading
def _open_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text") from exc


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, parsed_object_or_exception)`` for a JSONL file or a JSON list.

    ``where`` is ``file:line`` (plus ``(record N)`` inside a JSON list, whose records may share a line).
    Parse failures of single JSONL lines are yielded as ``DataError`` so the caller may skip them.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = _open_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _json_list(path, text)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{path}:{n}", DataError(f"{path}:{n}: invalid JSON ({exc.msg})")


def _json_list(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level JSON list, each with the line it starts on (for file:line errors)."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)

    def skip_ws(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    i = skip_ws(i)
    if i < n and text[i] == "]":
        return
    index = 0
    while i < n:
        line = text.count("\n", 0, i) + 1
        index += 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        yield f"{path}:{line} (record {index})", obj
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
        elif i < n and text[i] == "]":
            return
        else:
            raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: expected ',' or ']' in JSON list")
    raise DataError(f"{path}: JSON list is not closed (truncated file?)")


def record_to_messages(rec: Any, where: str) -> list[dict[str, str]]:
    """Normalize one record of any supported format to a validated conversation."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(rec).__name__}")

    def text_field(key: str, required: bool = True) -> str:
        v = rec.get(key, "" if not required else None)
        if v is None or not isinstance(v, str):
            raise DataError(f"{where}: field '{key}' must be a string")
        return v

    if "messages" in rec:
        return validate_messages(rec["messages"], where)
    if "instruction" in rec and "output" in rec:
        instruction, extra = text_field("instruction"), text_field("input", required=False)
        output = text_field("output")
        if not instruction.strip() or not output.strip():
            raise DataError(f"{where}: empty 'instruction' or 'output'")
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output.strip()}]
    if "prompt" in rec and "completion" in rec:
        prompt, completion = text_field("prompt"), text_field("completion")
        if not completion.strip():
            raise DataError(f"{where}: empty 'completion'")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if "question" in rec and "answer" in rec:
        return [
            {"role": "user", "content": text_field("question")},
            {"role": "assistant", "content": text_field("answer")},
        ]
    keys = ", ".join(sorted(rec)) or "none"
    raise DataError(
        f"{where}: unknown record format (keys: {keys}); expected messages, instruction/input/output, "
        "prompt/completion or question/answer"
    )


def load_conversations(
    source: str | Path, skip_invalid: bool = False, stats: LoadStats | None = None, limit: int | None = None
) -> list[Conversation]:
    """Conversations from a file path or a shipped data set name (``alpaca``, ``gsm8k``, ``math``)."""
    stats = stats if stats is not None else LoadStats()
    path = NAMED_DATA.get(str(source), Path(source))
    # The shipped sets are used as published; the few records they hold with an empty answer (2 in Alpaca,
    # 3 in the math set) are skipped and counted rather than stopping a run.
    skip_invalid = skip_invalid or str(source) in NAMED_DATA
    out: list[Conversation] = []
    for where, rec in read_records(path):
        stats.records += 1
        try:
            if isinstance(rec, DataError):
                raise rec
            out.append(Conversation(record_to_messages(rec, where), where))
        except DataError as exc:
            if not skip_invalid:
                raise
            stats.skipped_invalid += 1
            if len(stats.errors) < 5:
                stats.errors.append(str(exc))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no valid records")
    return out


def dedup_prompts(convs: Sequence[Conversation], stats: LoadStats | None = None) -> list[Conversation]:
    """Keep the first conversation of each distinct prompt (all turns before the last assistant turn)."""
    seen: set[str] = set()
    out = []
    for c in convs:
        last = max(i for i, m in enumerate(c.messages) if m["role"] == "assistant")
        key = json.dumps([(m["role"], " ".join(m["content"].split())) for m in c.messages[:last]])
        if key in seen:
            if stats is not None:
                stats.duplicates += 1
            continue
        seen.add(key)
        out.append(c)
    return out


def split_conversations(
    convs: Sequence[Conversation], val_fraction: float, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """Deterministic random train/val split (val gets at least one example when the fraction is > 0)."""
    order = np.random.default_rng(seed).permutation(len(convs))
    n_val = 0 if val_fraction <= 0 else max(1, int(round(val_fraction * len(convs))))
    n_val = min(n_val, len(convs) - 1)
    val = [convs[i] for i in sorted(order[:n_val])]
    train = [convs[i] for i in sorted(order[n_val:])]
    return train, val


def encode_conversations(
    tokenizer: Any,
    convs: Sequence[Conversation],
    max_len: int,
    truncation: str = "right",
    template: str | None = None,
    stats: LoadStats | None = None,
) -> list[TokenizedChat]:
    """Tokenize with assistant-only labels and apply the truncation policy (see the module docstring)."""
    if truncation not in TRUNCATIONS:
        raise DataError(f"truncation must be one of {list(TRUNCATIONS)}, got {truncation!r}")
    stats = stats if stats is not None else LoadStats()
    out = []
    for c in convs:
        ex = tokenize_chat(tokenizer, c.messages, template, where=c.where)
        if len(ex.input_ids) > max_len:
            if truncation == "off":
                raise DataError(
                    f"{c.where}: conversation is {len(ex.input_ids)} tokens, longer than max_len={max_len} "
                    "(use truncation=right or truncation=drop, or raise max_len)"
                )
            if truncation == "drop":
                stats.dropped_too_long += 1
                continue
            ex = TokenizedChat(ex.input_ids[:max_len], ex.labels[:max_len])
            stats.truncated += 1
        # Needs a target token that is not the first token (it has no predecessor to predict it from).
        if not any(x != IGNORE_INDEX for x in ex.labels[1:]):
            stats.dropped_too_long += 1
            continue
        out.append(ex)
    if not out:
        raise DataError("no SFT examples left after tokenization and truncation")
    return out


# --------------------------------------------------------------------------------------- batching
def pack_rows(examples: Sequence[TokenizedChat], order: Sequence[int], seq_len: int) -> list[list[int]]:
    """Greedy first-fit in the given order: lists of example indices whose shifted lengths fit ``seq_len``."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = len(examples[i].input_ids) - 1  # shifted: T tokens give T-1 predictions
        if current and used + n > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(int(i))
        used += n
    if current:
        rows.append(current)
    return rows


def collate(
    examples: Sequence[TokenizedChat], rows: Sequence[Sequence[int]], seq_len: int, pad_id: int, pack: bool
) -> dict[str, torch.Tensor]:
    """Tensors for rows of example indices. Labels are already shifted: ``labels[t]`` is the token after ``t``."""
    B = len(rows)
    width = seq_len if pack else max(len(examples[r[0]].input_ids) - 1 for r in rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, width), dtype=torch.long)
    segments = torch.zeros((B, width), dtype=torch.long)
    valid = torch.zeros((B, width), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for seg, i in enumerate(row, 1):
            ex = examples[i]
            n = len(ex.input_ids) - 1
            ids[b, t : t + n] = torch.tensor(ex.input_ids[:-1])
            labels[b, t : t + n] = torch.tensor(ex.labels[1:])
            positions[b, t : t + n] = torch.arange(n)
            segments[b, t : t + n] = seg
            valid[b, t : t + n] = 1
            t += n
        # Padding tail of a packed row: its own segment, positions continue (never attended by real tokens).
        if t < width:
            positions[b, t:] = torch.arange(width - t)
    if pack:
        return {"input_ids": ids, "labels": labels, "positions": positions, "segment_ids": segments}
    return {"input_ids": ids, "labels": labels, "attention_mask": valid}


@dataclass
class SFTBatchSource:
    """A :class:`llmlab.data.loader.BatchSource` over tokenized conversations.

    Each epoch is a fresh permutation from ``(seed, epoch)``, packed (or not) into rows; the global batch
    ``k`` takes rows ``k*global_batch ...`` of the epoch's row list, and rank ``r`` takes every
    ``world_size``-th of them. ``replay`` optionally mixes in rows of pretraining tokens (all positions are
    targets) with probability ``replay_fraction`` per row, to reduce forgetting.
    """

    examples: Sequence[TokenizedChat]
    batch_size: int
    seq_len: int
    pad_id: int
    pack: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    replay: np.ndarray | None = None
    replay_fraction: float = 0.0
    step: int = 0

    def __post_init__(self) -> None:
        too_long = [len(e.input_ids) - 1 for e in self.examples if len(e.input_ids) - 1 > self.seq_len]
        if too_long:
            raise DataError(f"an example has {too_long[0]} positions, more than seq_len={self.seq_len}")
        self._epoch_rows: dict[int, list[list[int]]] = {}
        self.rows_per_epoch = len(self._rows(0))

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.rows_per_epoch // self.global_batch)

    def _rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_rows:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            rows = pack_rows(self.examples, order, self.seq_len) if self.pack else [[int(i)] for i in order]
            self._epoch_rows = {epoch: rows}  # keep only the current epoch
        return self._epoch_rows[epoch]

    def batch_at(self, k: int) -> dict[str, torch.Tensor]:
        epoch, idx = divmod(k, self.steps_per_epoch)
        rows = self._rows(epoch)
        start = idx * self.global_batch
        picked = [rows[(start + j) % len(rows)] for j in range(self.global_batch)][
            self.rank :: self.world_size
        ]
        batch = collate(self.examples, picked, self.seq_len, self.pad_id, self.pack)
        if self.replay is not None and self.replay_fraction > 0:
            self._mix_replay(batch, k)
        return batch

    def _mix_replay(self, batch: dict[str, torch.Tensor], k: int) -> None:
        rng = np.random.default_rng([self.seed, k, 7])
        use = rng.random(self.global_batch)[self.rank :: self.world_size] < self.replay_fraction
        width = batch["input_ids"].shape[1]
        if len(self.replay) < width + 2:
            raise DataError(f"replay corpus has {len(self.replay)} tokens, fewer than one row of {width + 1}")
        offsets = rng.integers(0, len(self.replay) - width - 1, size=len(use))
        # Which rows are pretraining text: a loss may treat them differently (e.g. distill to the base).
        batch["replay_rows"] = torch.from_numpy(use.copy())
        for b in np.nonzero(use)[0]:
            window = torch.from_numpy(self.replay[offsets[b] : offsets[b] + width + 1].astype(np.int64))
            batch["input_ids"][b], batch["labels"][b] = window[:-1], window[1:]
            if "positions" in batch:
                batch["positions"][b] = torch.arange(width)
                batch["segment_ids"][b] = 1
            else:
                batch["attention_mask"][b] = 1

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.seed = int(state.get("seed", self.seed))


def iterate_examples(
    examples: Sequence[TokenizedChat], batch_size: int, seq_len: int, pad_id: int, pack: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """One deterministic pass over examples in order (for validation loss)."""
    order = list(range(len(examples)))
    rows = pack_rows(examples, order, seq_len) if pack else [[i] for i in order]
    for s in range(0, len(rows), batch_size):
        yield collate(examples, rows[s : s + batch_size], seq_len, pad_id, pack)
