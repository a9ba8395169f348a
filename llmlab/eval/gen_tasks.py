"""Generative tasks: prompts, answer extraction and scoring; generation itself goes through ``llmlab.LLM``.

- GSM8K (lm-eval's ``gsm8k``): ``"Question: {q}\\nAnswer:"``, k-shot exemplars ``"Question: ..\\nAnswer:
  {solution}"`` (drawn from GSM8K train per document by lm-eval's seeded sampler) joined by blank lines,
  greedy, stop at ``"Question:"``, ``"</s>"``, ``"<|im_end|>"``, 256 new tokens. ``exact_match_strict`` takes the first ``#### N``,
  ``exact_match_flexible`` the last number (lm-eval's two filters); ``exact_match`` is the strict one.
- SVAMP, MultiArith, AddSub, SingleEq, MAWPS: the same prompt, numeric match of the last number.
- AQuA: the question carries ``Answer Choices: (A) ..``; the last answer letter is compared.
- ``task_suite``: llmlab's verifiable tasks (:mod:`llmlab.data.tasks`), held-out split, chat prompts,
  scored by the suite's own strict checkers (``exact_match`` and ``format_ok``).

With ``chat=True`` the prompt (exemplars included) is sent as one user message through the chat template.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmlab.data.tasks import make_test_set, score
from llmlab.errors import ConfigError
from llmlab.eval.metrics import (
    INVALID,
    extract_flexible,
    extract_letter,
    extract_strict,
    gsm8k_normalize,
    numbers_equal,
)
from llmlab.eval.records import ASSETS, EVAL_ASSETS, MalformedRecord, read_json_records

GSM8K_TRAIN = ASSETS / "sft" / "gsm8k_train.jsonl.gz"
GSM8K_STOP = ["Question:", "</s>", "<|im_end|>"]
_NUMERIC_FILES = {
    "svamp": ASSETS / "preference" / "svamp_test.jsonl.gz",
    "multiarith": ASSETS / "preference" / "multiarith_test.jsonl.gz",
    "addsub": ASSETS / "preference" / "addsub_test.jsonl.gz",
    "singleeq": ASSETS / "preference" / "singleeq_test.jsonl.gz",
    "mawps": EVAL_ASSETS / "mawps_test.json.gz",
}
SUITE_PER_TASK = 20  # task_suite: held-out prompts per verifiable task (9 tasks)


@dataclass
class GenDoc:
    """One generation request: ``prompt`` text (or chat messages), the reference answer and its scorer."""

    where: str
    prompt: str | list[dict[str, str]]
    target: str
    max_tokens: int = 256
    stop: list[str] = field(default_factory=lambda: list(GSM8K_STOP))
    record: dict[str, Any] = field(default_factory=dict)


def _question_answer(rec: Any, where: str, q_keys: tuple[str, ...]) -> tuple[str, str]:
    if not isinstance(rec, dict):
        raise MalformedRecord(where, "expected a JSON object")
    q = next((rec[k] for k in q_keys if isinstance(rec.get(k), str) and rec[k].strip()), None)
    a = rec.get("answer")
    if q is None or a is None or not str(a).strip():
        raise MalformedRecord(where, f"needs a question ({'/'.join(q_keys)}) and an answer")
    return " ".join(q.split()) if "instruction" in q_keys else q, str(a).strip()


# lm-eval's default few-shot sampler: one ``random.Random(1234)`` (its ``fewshot_random_seed``) draws
# ``random.sample(train, shots)`` for each evaluated document in order (the few-shot split is not the test
# split, so there is no document of its own to leave out). Checked against lm-eval 0.4.13's contexts.
FEWSHOT_SEED = 1234


class GSM8KExemplars:
    """Few-shot prefixes drawn exactly as lm-evaluation-harness 0.4 draws them for ``gsm8k``: a fresh
    sampler per task run, consulted once per document in document order (so ``--limit N`` sees the same
    prefixes as the first N documents of a full run)."""

    def __init__(self, shots: int):
        recs, _ = read_json_records(GSM8K_TRAIN)
        if shots > len(recs):
            raise ConfigError(f"--shots {shots}: the GSM8K train pool has only {len(recs)} exemplars")
        self.shots, self.pool = shots, [r for _, r in recs]
        self.rnd = random.Random(FEWSHOT_SEED)

    def next_prefix(self) -> str:
        if not self.shots:
            return ""
        picks = self.rnd.sample(range(len(self.pool)), self.shots)
        return "".join(
            f"Question: {self.pool[i]['question']}\nAnswer: {self.pool[i]['answer']}\n\n" for i in picks
        )


def _docs(path: Any, shots: int, chat: bool, q_keys: tuple[str, ...]) -> tuple[list[GenDoc], list]:
    recs, bad = read_json_records(path)
    bad = list(bad)
    exemplars = GSM8KExemplars(shots)
    docs = []
    for where, rec in recs:
        try:
            question, answer = _question_answer(rec, where, q_keys)
        except MalformedRecord as exc:
            bad.append(exc)
            continue
        text = f"{exemplars.next_prefix()}Question: {question}\nAnswer:"
        prompt: Any = [{"role": "user", "content": text}] if chat else text
        docs.append(GenDoc(where, prompt, answer))
    return docs, bad


def build_gsm8k(shots: int | None, chat: bool) -> tuple[list[GenDoc], list]:
    return _docs(EVAL_ASSETS / "gsm8k_test.jsonl.gz", (0 if chat else 5) if shots is None else shots, chat,
                 ("question",))  # fmt: skip


def build_numeric(name: str) -> Callable[[int | None, bool], tuple[list[GenDoc], list]]:
    keys = ("instruction",) if name == "mawps" else ("question",)
    return lambda shots, chat: _docs(_NUMERIC_FILES[name], shots or 0, chat, keys)


def build_aqua(shots: int | None, chat: bool) -> tuple[list[GenDoc], list]:
    if shots:
        raise ConfigError("--shots: aqua has no exemplar pool (zero-shot only)")
    return _docs(EVAL_ASSETS / "aqua_test.json.gz", 0, chat, ("instruction",))


def build_suite(shots: int | None, chat: bool) -> tuple[list[GenDoc], list]:
    if shots:
        raise ConfigError("--shots: task_suite is zero-shot (chat prompts)")
    docs = [
        GenDoc(
            f"task_suite:{r['task']}#{i}",
            [{"role": "user", "content": r["prompt"]}],
            str(r["answer"]),
            max_tokens=64,
            stop=[],
            record=r,
        )  # fmt: skip
        for i, r in enumerate(make_test_set(SUITE_PER_TASK))
    ]
    return docs, []


# ------------------------------------------------------------------------------------ scoring
def score_gsm8k(completion: str, target: str) -> dict[str, float]:
    gold = gsm8k_normalize(target)
    strict, flexible = extract_strict(completion), extract_flexible(completion)
    return {
        "exact_match_strict": float(strict != INVALID and gsm8k_normalize(strict) == gold),
        "exact_match_flexible": float(flexible != INVALID and gsm8k_normalize(flexible) == gold),
    }


def score_numeric(completion: str, target: str) -> dict[str, float]:
    return {"exact_match": float(numbers_equal(extract_flexible(completion), target))}


def score_letter(completion: str, target: str) -> dict[str, float]:
    return {"exact_match": float(extract_letter(completion) == target.strip().upper())}


def score_suite(completion: str, doc: GenDoc) -> dict[str, float]:
    s = score(doc.record["task"], doc.record, completion)
    return {"exact_match": float(s["correct"]), "format_ok": float(s["format_ok"])}


GEN_BUILDERS: dict[str, Callable[[int | None, bool], tuple[list[GenDoc], list]]] = {
    "gsm8k": build_gsm8k,
    **{name: build_numeric(name) for name in _NUMERIC_FILES},
    "aqua": build_aqua,
    "task_suite": build_suite,
}


def score_doc(task: str, completion: str, doc: GenDoc) -> dict[str, float]:
    if task == "gsm8k":
        out = score_gsm8k(completion, doc.target)
        return {"exact_match": out["exact_match_strict"], **out}
    if task == "aqua":
        return score_letter(completion, doc.target)
    if task == "task_suite":
        return score_suite(completion, doc)
    return score_numeric(completion, doc.target)


GEN_METRICS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("exact_match", "exact_match_strict", "exact_match_flexible"),
    "task_suite": ("exact_match", "format_ok"),
    **{name: ("exact_match",) for name in [*_NUMERIC_FILES, "aqua"]},
}
