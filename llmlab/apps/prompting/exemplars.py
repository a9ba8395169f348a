"""Few-shot exemplar pools and their selection: seeded random, or the k most similar by embedding.

Pools:

- :func:`gsm8k_pool`: GSM8K *train* problems with their human-written solutions (calculator annotations
  ``<<48/2=24>>`` removed, the final ``#### N`` split off as the answer). The math word-problem tasks are
  scored on SVAMP/MultiArith/AddSub/SingleEq *test* files, so the pool is disjoint from them by source; the
  selector also drops any exemplar whose question text equals a scored one.
- :func:`suite_pool`: training-split records of llmlab's verifiable task suite (disjoint from its test split
  by the suite's hash split), answers only (no worked solutions: no chain-of-thought exemplars).

Selection (:class:`ExemplarSelector`): ``random`` draws one fixed set of k exemplars from a seeded RNG (the
same prompt prefix for every question, as a fixed k-shot prompt is usually built); ``similar`` takes, per
question, the k pool questions with the highest cosine similarity of their embeddings (Liu et al. 2022,
"What makes good in-context examples for GPT-3?"), most similar last, nearest the question.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llmlab.apps.prompting.builders import Exemplar
from llmlab.data.tasks import make_sft_examples
from llmlab.errors import ConfigError
from llmlab.eval.records import ASSETS, read_json_records

GSM8K_TRAIN = ASSETS / "sft" / "gsm8k_train.jsonl.gz"
_CALC = re.compile(r"<<[^>]*>>")
Embed = Callable[[list[str]], Any]  # texts -> (n, d) array of embeddings


def gsm8k_pool(limit: int | None = None) -> list[Exemplar]:
    """The first ``limit`` GSM8K train problems as exemplars with worked solutions."""
    records, _ = read_json_records(GSM8K_TRAIN)
    pool = []
    for _, rec in records[:limit]:
        solution, _, answer = str(rec["answer"]).rpartition("####")
        rationale = _CALC.sub("", solution).strip()
        pool.append(Exemplar(rec["question"].strip(), answer.strip().replace(",", ""), rationale))
    return pool


def suite_pool(n: int = 200, seed: int = 0, tasks: Sequence[str] | None = None) -> list[Exemplar]:
    """``n`` training-split task-suite records (round-robin over the tasks) as answer-only exemplars."""
    return [Exemplar(r["prompt"], r["answer"]) for r in make_sft_examples(n, seed=seed, tasks=tasks)]


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def _unit_rows(vectors: Any) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ExemplarSelector:
    """Pick ``k`` exemplars per question from ``pool``, never one whose question is in ``exclude``.

    ``method="random"``: one seeded draw shared by every question. ``method="similar"``: the ``k`` most
    similar pool questions under ``embed`` (a function from texts to an ``(n, d)`` array; pool embeddings are
    computed once, in one batch).
    """

    def __init__(
        self,
        pool: Sequence[Exemplar],
        k: int,
        method: str = "random",
        seed: int = 0,
        embed: Embed | None = None,
        exclude: Sequence[str] = (),
    ):
        if method not in ("random", "similar"):
            raise ConfigError(f"exemplar selection {method!r}: use 'random' or 'similar'")
        if k < 0:
            raise ConfigError(f"--k {k}: the number of exemplars cannot be negative")
        banned = {_key(q) for q in exclude}
        self.pool = [e for e in pool if _key(e.question) not in banned]
        if k > len(self.pool):
            raise ConfigError(f"--k {k}: the exemplar pool has only {len(self.pool)} usable exemplars")
        self.k, self.method, self.seed = k, method, seed
        self.embed = embed
        self._fixed = random.Random(seed).sample(self.pool, k) if method == "random" else None
        self._pool_vectors: np.ndarray | None = None
        if method == "similar":
            if embed is None:
                raise ConfigError("exemplar selection 'similar' needs an embedder")
            if k:
                self._pool_vectors = _unit_rows(embed([e.question for e in self.pool]))

    def select(self, question: str) -> list[Exemplar]:
        return self.select_many([question])[0]

    def select_many(self, questions: Sequence[str]) -> list[list[Exemplar]]:
        """The exemplars of each question (one embedding batch for all of them with ``similar``)."""
        if self._fixed is not None or self.k == 0:
            return [list(self._fixed or []) for _ in questions]
        assert self.embed is not None and self._pool_vectors is not None
        sims = _unit_rows(self.embed(list(questions))) @ self._pool_vectors.T
        out = []
        for question, row in zip(questions, sims, strict=True):
            order = np.argsort(-row, kind="stable")
            picked = [self.pool[i] for i in order if _key(self.pool[i].question) != _key(question)][: self.k]
            out.append(picked[::-1])  # the most similar exemplar sits next to the question
        return out
