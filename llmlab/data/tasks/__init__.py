"""A suite of small verifiable tasks: how a tiny CPU model shows instruction following.

Each task produces prompts with exactly one correct, strictly formatted answer, so the whole pipeline can
be measured by exact match: SFT examples (:func:`make_sft_examples`), a held-out test set disjoint from them
(:func:`make_test_set`), preference pairs for DPO/RM (:func:`make_preference_pairs`) and a scorer
(:func:`score`).

**Train/test disjointness by construction:** every prompt is assigned to a split by a hash of its text
(:func:`split_of`), so a test prompt can never appear in the training examples, whatever the seeds or
counts. A record is ``{"task", "prompt", "answer"}``; SFT examples add ``messages`` (user + assistant).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from llmlab.data.tasks.generators import (
    Addition,
    CountLetters,
    CountWords,
    ExtractField,
    JsonShape,
    Multiplication,
    Reverse,
    SortNumbers,
    Task,
    UnitConversion,
)
from llmlab.errors import ConfigError

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Addition(),
        Multiplication(),
        Reverse(),
        SortNumbers(),
        CountLetters(),
        CountWords(),
        UnitConversion(),
        JsonShape(),
        ExtractField(),
    )
}
TEST_PERCENT = 10  # share of the prompt space that belongs to the held-out split


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r} (tasks: {', '.join(TASKS)})")
    return TASKS[name]


def _tasks(tasks: Sequence[str] | None) -> list[Task]:
    return [get_task(n) for n in (tasks or list(TASKS))]


def split_of(prompt: str) -> str:
    """'test' for about ``TEST_PERCENT`` % of prompts (by a stable hash of the text), else 'train'."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return "test" if h % 100 < TEST_PERCENT else "train"


def _sample_split(task: Task, rng: random.Random, split: str, tries: int = 1000) -> dict[str, Any]:
    for _ in range(tries):
        rec = task.sample(rng)
        if split_of(rec["prompt"]) == split:
            return rec
    raise ConfigError(f"task {task.name!r}: could not draw a {split} prompt in {tries} tries")


def to_messages(record: dict[str, Any], answer: str | None = None) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["answer"] if answer is None else answer},
    ]


def make_sft_examples(n: int, seed: int = 0, tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``n`` training-split records (round-robin over tasks) with chat ``messages``."""
    rng = random.Random(seed)
    chosen = _tasks(tasks)
    out = []
    for i in range(n):
        rec = _sample_split(chosen[i % len(chosen)], rng, "train")
        out.append({**rec, "messages": to_messages(rec)})
    return out


def make_test_set(
    n_per_task: int, seed: int = 1234, tasks: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Held-out records (test split only), ``n_per_task`` distinct prompts per task where possible."""
    rng = random.Random(seed)
    out = []
    for task in _tasks(tasks):
        seen: set[str] = set()
        for _ in range(n_per_task * 20):
            if len(seen) >= n_per_task:
                break
            rec = _sample_split(task, rng, "test")
            if rec["prompt"] not in seen:
                seen.add(rec["prompt"])
                out.append(rec)
    return out


def make_preference_pairs(n: int, seed: int = 0, tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``{"task", "prompt", "answer", "chosen", "rejected", "kind"}`` on training-split prompts.

    ``rejected`` is a plausible wrong answer (``kind="wrong"``, two out of three) or the right value badly
    formatted (``kind="format"``).
    """
    rng = random.Random(seed)
    chosen_tasks = _tasks(tasks)
    out = []
    for i in range(n):
        task = chosen_tasks[i % len(chosen_tasks)]
        rec = _sample_split(task, rng, "train")
        kind = "format" if rng.random() < 1 / 3 else "wrong"
        rejected = task.badly_formatted(rec, rng) if kind == "format" else task.wrong_answer(rec, rng)
        out.append({**rec, "chosen": rec["answer"], "rejected": rejected, "kind": kind})
    return out


def score(task: str | Task, record: dict[str, Any], completion: str) -> dict[str, bool]:
    """``{"correct": parsed answer equals the expected one, "format_ok": strictly in the asked format}``."""
    t = get_task(task) if isinstance(task, str) else task
    return t.score(record, completion)


def evaluate(records: Sequence[dict[str, Any]], completions: Sequence[str]) -> dict[str, float]:
    """Exact match and format rate, overall and per task."""
    per: dict[str, list[dict[str, bool]]] = {}
    for rec, comp in zip(records, completions, strict=True):
        per.setdefault(rec["task"], []).append(score(rec["task"], rec, comp))
    out: dict[str, float] = {}
    all_scores = [s for v in per.values() for s in v]
    out["exact_match"] = sum(s["correct"] for s in all_scores) / max(len(all_scores), 1)
    out["format_ok"] = sum(s["format_ok"] for s in all_scores) / max(len(all_scores), 1)
    for name, scores in per.items():
        out[f"exact_match/{name}"] = sum(s["correct"] for s in scores) / len(scores)
    return out


__all__ = [
    "TASKS",
    "Task",
    "evaluate",
    "get_task",
    "make_preference_pairs",
    "make_sft_examples",
    "make_test_set",
    "score",
    "split_of",
    "to_messages",
]
