"""Preference data: loading, validation, tokenization and batching for reward models and DPO-family losses.

A preference pair is a prompt conversation plus two candidate final assistant turns, ``chosen`` (preferred)
and ``rejected``. Accepted record formats (JSONL or a JSON list, ``.gz`` read transparently):

- ``{"prompt": str | [messages], "chosen": str, "rejected": str, "margin"?: float}``
- hh-rlhf transcripts ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``: both share the
  dialogue up to the last ``Assistant:``; the turns differ only there.

Named sources (shipped in ``llmlab/assets/preference``, see its SOURCES.md): ``hh-rlhf`` (first 2,000 pairs),
``hh-rlhf-heldout`` (last 312), ``gsm8k-pairs`` (correct vs incorrect GPT-3 solutions to GSM8K *test*
questions: marked so nothing reports GSM8K-test after training on them) and ``tasks`` (the task suite's
verifier-built pairs, when :mod:`llmlab.data.tasks` is installed).

Bad records (a missing field, an empty response, identical chosen and rejected, a prompt longer than the
context) raise :class:`DataError` naming ``file:line``; with ``skip_invalid`` they are counted and skipped.

Tokenization reuses the SFT chat template (:func:`llmlab.sft.chat.tokenize_chat`): a response is the final
assistant turn's tokens including its end marker; everything before it (system/user turns, earlier assistant
turns, template tokens) is the prompt and never counts for a loss.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.data import tasks
from llmlab.errors import DataError
from llmlab.sft.chat import IGNORE_INDEX, tokenize_chat, validate_messages
from llmlab.sft.datasets import read_records

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "preference"
HH_FILE = ASSETS / "hh_rlhf_harmless_base_test.jsonl.gz"
HH_TRAIN = 2000  # first 2,000 hh-rlhf pairs train, the remaining 312 are held out
GSM8K_PAIRS_FILE = ASSETS / "gsm8k_test_solution_pairs.jsonl.gz"
NAMED_PAIRS = ("hh-rlhf", "hh-rlhf-heldout", "gsm8k-pairs", "tasks")


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]  # the conversation before the final assistant turn
    chosen: str
    rejected: str
    where: str  # file:line it came from
    margin: float | None = None
    contaminates: str | None = None  # an eval set these prompts come from (e.g. "gsm8k-test")


@dataclass
class DataStats:
    records: int = 0
    skipped_invalid: int = 0
    truncated: int = 0
    errors: list[str] = field(default_factory=list)  # the first few skip reasons
    extra: dict[str, float] = field(default_factory=dict)  # source-specific counts (e.g. on-policy sampling)

    def skip(self, exc: Exception) -> None:
        self.skipped_invalid += 1
        if len(self.errors) < 5:
            self.errors.append(str(exc))


# ------------------------------------------------------------------------------------------ parsing
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str, where: str) -> tuple[list[dict[str, str]], str]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b ..."`` -> (messages before the last assistant turn, its text)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(
            f"{where}: not an hh-rlhf transcript (expected '\\n\\nHuman: ... \\n\\nAssistant: ...')"
        )
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: transcript does not end with an Assistant turn")
    return messages[:-1], messages[-1]["content"]


def record_to_pair(rec: Any, where: str) -> PreferencePair:
    """Validate one record and normalize it to a :class:`PreferencePair`."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(rec).__name__}")
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise DataError(f"{where}: missing field '{key}'")
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: field '{key}' must be a string")
    if "prompt" in rec:
        prompt = rec["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DataError(f"{where}: empty 'prompt'")
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            messages = validate_messages([*prompt, {"role": "assistant", "content": ""}], where)[:-1]
            if not messages:
                raise DataError(f"{where}: empty 'prompt'")
        else:
            raise DataError(f"{where}: field 'prompt' must be a string or a list of messages")
        chosen, rejected = rec["chosen"], rec["rejected"]
    else:
        messages, chosen = parse_hh_transcript(rec["chosen"], where)
        rej_messages, rejected = parse_hh_transcript(rec["rejected"], where)
        if rej_messages != messages:
            raise DataError(
                f"{where}: 'chosen' and 'rejected' transcripts differ before the last Assistant turn"
            )
    if not chosen.strip():
        raise DataError(f"{where}: empty 'chosen' response")
    if not rejected.strip():
        raise DataError(f"{where}: empty 'rejected' response")
    if chosen.strip() == rejected.strip():
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical (the pair carries no preference)")
    margin = rec.get("margin")
    if margin is not None and not isinstance(margin, (int, float)):
        raise DataError(f"{where}: field 'margin' must be a number")
    return PreferencePair(
        messages,
        chosen.strip(),
        rejected.strip(),
        where,
        None if margin is None else float(margin),
        rec.get("contaminates"),
    )


def load_pairs(
    source: str | Path,
    skip_invalid: bool = False,
    stats: DataStats | None = None,
    limit: int | None = None,
) -> list[PreferencePair]:
    """Preference pairs from a file or a named source (see the module docstring)."""
    stats = stats if stats is not None else DataStats()
    name = str(source)
    if name == "tasks":
        return _task_pairs(limit)
    # The shipped hh-rlhf file has 9 malformed pairs (empty responses, diverging transcripts): named sources
    # always skip (and count) them, since the user cannot fix shipped data.
    skip_invalid = skip_invalid or name in NAMED_PAIRS
    path, lo, hi = {
        "hh-rlhf": (HH_FILE, 0, HH_TRAIN),
        "hh-rlhf-heldout": (HH_FILE, HH_TRAIN, None),
        "gsm8k-pairs": (GSM8K_PAIRS_FILE, 0, None),
    }.get(name, (Path(source), 0, None))
    out: list[PreferencePair] = []
    for i, (line, rec) in enumerate(read_records(path)):
        if i < lo or (hi is not None and i >= hi):
            continue
        stats.records += 1
        try:
            if isinstance(rec, Exception):
                raise rec
            # read_records yields "file:line" (older versions: the line number alone).
            out.append(record_to_pair(rec, line if isinstance(line, str) else f"{path}:{line}"))
        except DataError as exc:
            if not skip_invalid:
                raise
            stats.skip(exc)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no valid preference pairs")
    contaminated = {p.contaminates for p in out if p.contaminates}
    if contaminated:
        warnings.warn(
            f"{path}: these prompts come from {', '.join(sorted(contaminated))}; do not report that benchmark "
            "for a model trained on them",
            stacklevel=2,
        )
    return out


def _task_pairs(limit: int | None) -> list[PreferencePair]:
    """The task suite's preference pairs: the verifier's answer vs a wrong or badly formatted one."""

    pairs = tasks.make_preference_pairs(n=limit or 2000, seed=0)
    return [
        record_to_pair(
            {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}, f"tasks:{i}"
        )
        for i, p in enumerate(pairs)
    ]


def split_pairs(
    pairs: Sequence[PreferencePair], n_heldout: int, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministic random split into (train, held-out)."""
    if not 0 < n_heldout < len(pairs):
        raise DataError(f"cannot hold out {n_heldout} of {len(pairs)} pairs")
    order = np.random.default_rng(seed).permutation(len(pairs))
    held = set(order[:n_heldout].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


# ------------------------------------------------------------------------------------- tokenization
@dataclass
class Encoded:
    """One tokenized (prompt, response): only ``response`` tokens count for losses."""

    prompt: list[int]
    response: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.response


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    where: str
    margin: float = 0.0


def encode_response(
    tokenizer: Any, prompt: list[dict[str, str]], response: str, where: str, template: str | None = None
) -> Encoded:
    """Split the rendered ``prompt + [assistant: response]`` into prompt tokens and final-turn tokens."""
    ex = tokenize_chat(tokenizer, [*prompt, {"role": "assistant", "content": response}], template, where)
    labels = ex.labels
    last = max((i for i, x in enumerate(labels) if x != IGNORE_INDEX), default=-1)
    if last < 0:
        raise DataError(f"{where}: the response has no tokens after chat rendering")
    start = last
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if start == 0:
        raise DataError(f"{where}: the rendered conversation has no prompt tokens before the response")
    return Encoded(ex.input_ids[:start], ex.input_ids[start : last + 1])


def _fit(enc: Encoded, max_len: int, where: str, stats: DataStats) -> Encoded:
    if len(enc.prompt) >= max_len:
        raise DataError(
            f"{where}: prompt is {len(enc.prompt)} tokens, no room for a response within the context of "
            f"{max_len} tokens (raise max_len, or use --skip-invalid)"
        )
    if len(enc.ids) > max_len:
        stats.truncated += 1
        return Encoded(enc.prompt, enc.response[: max_len - len(enc.prompt)])
    return enc


def encode_pairs(
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    max_len: int,
    skip_invalid: bool = False,
    stats: DataStats | None = None,
    template: str | None = None,
) -> list[EncodedPair]:
    """Tokenize pairs; responses longer than the context are right-truncated (counted in ``stats``)."""
    stats = stats if stats is not None else DataStats()
    out = []
    for p in pairs:
        try:
            c = _fit(
                encode_response(tokenizer, p.prompt, p.chosen, p.where, template), max_len, p.where, stats
            )
            r = _fit(
                encode_response(tokenizer, p.prompt, p.rejected, p.where, template), max_len, p.where, stats
            )
            if c.response == r.response:
                raise DataError(f"{p.where}: chosen and rejected are identical after truncation to {max_len}")
            out.append(EncodedPair(c, r, p.where, p.margin or 0.0))
        except DataError as exc:
            if not skip_invalid:
                raise
            stats.skip(exc)
    if not out:
        raise DataError("no preference pairs left after tokenization")
    return out


def pad_sequences(seqs: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded next-token batch: ``labels[t]`` is token ``t+1`` when it is a response token, else -100."""
    width = max(len(s.ids) for s in seqs) - 1
    B = len(seqs)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for b, s in enumerate(seqs):
        full = s.ids
        n = len(full) - 1
        ids[b, :n] = torch.tensor(full[:-1])
        mask[b, :n] = 1
        p = len(s.prompt)
        labels[b, p - 1 : n] = torch.tensor(full[p:])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------------------------------ sources
@dataclass
class PairSource:
    """:class:`~llmlab.data.loader.BatchSource` of preference pairs: batch ``k`` is a function of ``(seed, k)``.

    A batch holds the ``B`` chosen sequences followed by the ``B`` rejected ones (one forward for both):
    ``input_ids/labels/attention_mask [2B, T]``, ``index [B]`` (pair ids, for the reference cache),
    ``margin [B]``, and ``ref_logps [2B]`` once :attr:`ref_logps` is filled.
    """

    pairs: Sequence[EncodedPair]
    batch_size: int
    pad_id: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    step: int = 0
    ref_logps: torch.Tensor | None = None  # [n, 2] summed reference log-probs of (chosen, rejected)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.pairs) // (self.batch_size * self.world_size))

    def indices_at(self, k: int) -> list[int]:
        epoch, idx = divmod(k, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        g = self.batch_size * self.world_size
        picked = [int(order[(idx * g + j) % len(order)]) for j in range(g)]
        return picked[self.rank :: self.world_size]

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        seqs = [self.pairs[i].chosen for i in idx] + [self.pairs[i].rejected for i in idx]
        batch = pad_sequences(seqs, self.pad_id)
        batch["index"] = torch.tensor(list(idx))
        batch["margin"] = torch.tensor([self.pairs[i].margin for i in idx], dtype=torch.float32)
        if self.ref_logps is not None:
            ref = self.ref_logps[torch.tensor(list(idx))]
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return batch

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.collate(self.indices_at(self.step))
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.seed = int(state["step"]), int(state.get("seed", self.seed))

    def iterate(self, batch_size: int):
        """One pass in order (evaluation, reference caching)."""
        for s in range(0, len(self.pairs), batch_size):
            yield self.collate(range(s, min(s + batch_size, len(self.pairs))))


@dataclass
class UnpairedSource(PairSource):
    """KTO's unpaired view of preference pairs: each chosen response is a desirable example, each rejected one
    undesirable (``2n`` examples).

    Example ``j``'s KL completion (for the reference point ``z0``) is a *mismatched* response: prompt ``j``
    with the response of example ``(j + 1) mod 2n``. The pairing is fixed per example (TRL pairs within a
    batch instead), so the reference log-probs of the KL sequences are cached once like the others.
    Batch keys: ``input_ids/labels/attention_mask [2B', T]`` (B' matched then B' KL sequences), ``desirable
    [B']``, ``index [B']`` and ``ref_logps [2B']`` once cached. The batch size counts examples.
    """

    @property
    def num_examples(self) -> int:
        return 2 * len(self.pairs)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.num_examples // (self.batch_size * self.world_size))

    def example(self, j: int) -> tuple[Encoded, bool]:
        p = self.pairs[j // 2]
        return (p.chosen, True) if j % 2 == 0 else (p.rejected, False)

    def kl_example(self, j: int) -> Encoded:
        enc, _ = self.example(j)
        other, _ = self.example((j + 1) % self.num_examples)
        if (j + 1) % self.num_examples // 2 == j // 2:  # same prompt: skip to the next pair's response
            other, _ = self.example((j + 2) % self.num_examples)
        # Both sequences fit the context, so the longer of their lengths does too.
        room = max(len(enc.ids), len(other.ids)) - len(enc.prompt)
        return Encoded(enc.prompt, other.response[:room])

    def indices_at(self, k: int) -> list[int]:
        epoch, idx = divmod(k, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        g = self.batch_size * self.world_size
        picked = [int(order[(idx * g + j) % len(order)]) for j in range(g)]
        return picked[self.rank :: self.world_size]

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        matched = [self.example(j) for j in idx]
        seqs = [e for e, _ in matched] + [self.kl_example(j) for j in idx]
        batch = pad_sequences(seqs, self.pad_id)
        batch["index"] = torch.tensor(list(idx))
        batch["desirable"] = torch.tensor([d for _, d in matched])
        if self.ref_logps is not None:
            ref = self.ref_logps[torch.tensor(list(idx))]
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return batch

    def iterate(self, batch_size: int):
        for s in range(0, self.num_examples, batch_size):
            yield self.collate(range(s, min(s + batch_size, self.num_examples)))
