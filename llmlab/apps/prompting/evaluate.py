"""Prompting techniques measured: accuracy with 95% Wilson intervals and the tokens each correct answer costs.

Tasks: the shipped math word problems (``svamp``, ``multiarith``, ``addsub``, ``singleeq``: the first
``limit`` test records, scored by the eval harness's last-number match) and ``task_suite`` (held-out records
of llmlab's verifiable tasks, scored by each task's own parser). Techniques (:mod:`.builders`): ``zero``,
``fewshot``, ``cot``, ``fewshot-cot`` and ``self-consistency`` (N sampled zero-shot-CoT paths, majority
vote; one row per N in ``sc_samples``, the smaller N using the first samples of the larger run).

Per (task, technique, N) cell: ``correct / n``, its Wilson interval, ``unparsed`` (replies with no answer),
``gen_tokens_per_correct`` (generated tokens / correct answers) and ``tokens_per_correct`` (prompt + generated
tokens, every sample's prompt counted: the compute a client pays for without prefix caching).

Each technique's prompts for all tasks go through one batched ``LLM.generate`` call.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from llmlab.apps.prompting.builders import TECHNIQUES, Exemplar, build, is_cot
from llmlab.apps.prompting.consistency import majority_vote, parse_number
from llmlab.apps.prompting.exemplars import Embed, ExemplarSelector, gsm8k_pool, suite_pool
from llmlab.apps.prompting.structured import generate_json
from llmlab.data.tasks import get_task, make_test_set
from llmlab.errors import ConfigError
from llmlab.eval.metrics import numbers_equal, wilson_interval
from llmlab.eval.records import ASSETS, read_json_records
from llmlab.infer import LLM, SamplingParams
from llmlab.infer.chat import chat_stop_ids

MATH_TASKS = ("svamp", "multiarith", "addsub", "singleeq")
ALL_TASKS = (*MATH_TASKS, "task_suite")
NUMBER_INSTRUCTION = "Answer with the number only."
COT_INSTRUCTION = 'End your reply with "The answer is N."'
_ANSWER_IS = "answer is"


@dataclass
class Problem:
    question: str
    answer: str
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskSpec:
    """A task's scored problems, its exemplar pool, its answer-format instructions and its scorer."""

    name: str
    problems: list[Problem]
    pool: list[Exemplar]
    instruction: str
    cot_instruction: str
    key: Callable[[Problem, str], str | None]  # completion -> the parsed answer as a vote key
    correct: Callable[[Problem, str], bool]  # (problem, vote key) -> right?


def _number_key(problem: Problem, completion: str) -> str | None:
    return parse_number(completion)


def _suite_key(problem: Problem, completion: str) -> str | None:
    # A reasoning reply states its result last: read after the final "answer is" when there is one.
    cut = completion.lower().rfind(_ANSWER_IS)
    text = completion[cut + len(_ANSWER_IS) :] if cut >= 0 else completion
    value = get_task(problem.record["task"]).parse(text)
    return None if value is None else json.dumps(value, sort_keys=True)


def _suite_correct(problem: Problem, key: str) -> bool:
    return json.loads(key) == get_task(problem.record["task"]).expected(problem.record)


def load_task(name: str, limit: int, pool_size: int = 1000) -> TaskSpec:
    """The first ``limit`` problems of a task (task_suite: ``ceil(limit / 9)`` per verifiable task)."""
    if limit < 1:
        raise ConfigError(f"--limit {limit}: score at least one question")
    if name in MATH_TASKS:
        records, _ = read_json_records(ASSETS / "preference" / f"{name}_test.jsonl.gz")
        problems = [Problem(r["question"], str(r["answer"])) for _, r in records[:limit]]
        return TaskSpec(name, problems, gsm8k_pool(pool_size), NUMBER_INSTRUCTION, COT_INSTRUCTION,
                        _number_key, lambda p, key: numbers_equal(key, p.answer))  # fmt: skip
    if name == "task_suite":
        per_task = max(1, math.ceil(limit / 9))
        problems = [Problem(r["prompt"], r["answer"], r) for r in make_test_set(per_task)]
        return TaskSpec(name, problems, suite_pool(min(pool_size, 500)), "", COT_INSTRUCTION,
                        _suite_key, _suite_correct)  # fmt: skip
    raise ConfigError(f"unknown task {name!r} (tasks: {', '.join(ALL_TASKS)})")


def parse_list(text: str, known: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise ConfigError(
            f"--{what} {text!r}: unknown {bad[0] if bad else 'empty list'} (one of {', '.join(known)})"
        )
    return items


@dataclass
class Cell:
    task: str
    technique: str
    samples: int
    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    unparsed: int
    prompt_tokens: int
    generated_tokens: int
    gen_tokens_per_correct: float | None
    tokens_per_correct: float | None
    mean_margin: float | None = None


def _cell(task: str, technique: str, samples: int, verdicts: list[bool], unparsed: int, prompt_tokens: int,
          generated: int, margins: list[float] | None = None) -> Cell:  # fmt: skip
    n, correct = len(verdicts), sum(verdicts)
    per = (lambda total: round(total / correct, 1)) if correct else (lambda total: None)
    lo, hi = wilson_interval(correct, n)
    return Cell(task, technique, samples, n, correct, round(correct / n, 4) if n else 0.0,
                (round(lo, 4), round(hi, 4)), unparsed, prompt_tokens, generated, per(generated),
                per(prompt_tokens + generated),
                round(sum(margins) / len(margins), 3) if margins else None)  # fmt: skip


Job = tuple[TaskSpec, Problem, Any, SamplingParams]


def _jobs(llm: LLM, spec: TaskSpec, technique: str, problems: list[Problem], samples: int, k: int,
          selection: str, embed: Embed | None, seed: int, temperature: float, max_tokens: int,
          stops: list[int]) -> list[Job]:  # fmt: skip
    """One engine request per (problem, sample) of a technique on a task (exemplars chosen here)."""
    shots: list[list[Exemplar]] = [[] for _ in problems]
    if technique in ("fewshot", "fewshot-cot") and k:
        pool = [e for e in spec.pool if e.rationale] if technique == "fewshot-cot" else spec.pool
        if not pool:
            return []  # no worked solutions to show (the task suite): the grid skips this cell
        selector = ExemplarSelector(pool, k, selection, seed, embed, [p.question for p in problems])
        shots = selector.select_many([p.question for p in problems])
    jobs = []
    for problem, exemplars in zip(problems, shots, strict=True):
        prompt = build(technique, problem.question, exemplars, spec.instruction, spec.cot_instruction)
        engine_prompt = prompt.engine_prompt(llm)
        for i in range(samples):
            params = SamplingParams(temperature=temperature if samples > 1 else 0.0, max_tokens=max_tokens,
                                    stop_token_ids=stops, seed=seed * 1_000_003 + i if samples > 1 else None)  # fmt: skip
            jobs.append((spec, problem, engine_prompt, params))
    return jobs


def _score(
    spec: TaskSpec, technique: str, groups: list[list[tuple[Job, Any]]], n_votes: int
) -> tuple[Cell, list[bool], list[float]]:
    """The cell of ``n_votes`` samples per problem (the first ones of each group), and its verdicts."""
    verdicts, margins, unparsed, prompt_tokens, generated = [], [], 0, 0, 0
    for group in groups:
        used = group[:n_votes]
        problem = used[0][0][1]
        keys = [spec.key(problem, out.text) for _, out in used]
        unparsed += sum(key is None for key in keys)
        vote = majority_vote(keys)
        margins.append(vote.margin)
        verdicts.append(vote.answer is not None and spec.correct(problem, vote.answer))
        prompt_tokens += sum(len(out.prompt_token_ids) for _, out in used)
        generated += sum(len(out.token_ids) for _, out in used)
    is_sc = technique == "self-consistency"
    cell = _cell(
        spec.name,
        technique,
        n_votes,
        verdicts,
        unparsed,
        prompt_tokens,
        generated,
        margins if is_sc else None,
    )
    return cell, verdicts, margins


def _pooled(technique: str, parts: list[tuple[Cell, list[bool], list[float]]]) -> Cell:
    """Every task's questions together: the tightest interval this run can give."""
    first = parts[0][0]
    return _cell("all", technique, first.samples, [v for _, vs, _ in parts for v in vs],
                 sum(c.unparsed for c, _, _ in parts), sum(c.prompt_tokens for c, _, _ in parts),
                 sum(c.generated_tokens for c, _, _ in parts),
                 [m for _, _, ms in parts for m in ms] if first.mean_margin is not None else None)  # fmt: skip


def evaluate_prompting(
    llm: LLM,
    tasks: Sequence[str] = MATH_TASKS,
    techniques: Sequence[str] = ("zero", "fewshot", "cot", "fewshot-cot"),
    limit: int = 50,
    k: int = 4,
    selection: str = "random",
    embed: Embed | None = None,
    sc_samples: Sequence[int] = (1, 5, 10),
    sc_limit: int | None = None,
    temperature: float = 0.7,
    max_tokens: int = 32,
    cot_max_tokens: int = 192,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Every (task, technique) cell on ``llm``; self-consistency on the first ``sc_limit`` (default
    ``limit``) problems of each task. Returns ``{"cells": [Cell as dict], "config": {...}, "examples": [the
    first reply of each task and technique]}``."""
    for t in techniques:
        if t not in TECHNIQUES:
            raise ConfigError(f"unknown technique {t!r} (one of {', '.join(TECHNIQUES)})")
    if any(s < 1 for s in sc_samples):
        raise ConfigError(f"--n {list(sc_samples)}: self-consistency needs at least one sample")
    start = time.perf_counter()
    specs = [load_task(name, limit) for name in tasks]
    stops = chat_stop_ids(llm.tokenizer)
    cells: list[Cell] = []
    seconds: dict[str, float] = {}
    examples: list[dict[str, Any]] = []
    skipped: list[str] = []
    for technique in techniques:
        is_sc = technique == "self-consistency"
        samples = max(sc_samples) if is_sc else 1
        length = cot_max_tokens if is_cot(technique) else max_tokens
        jobs = [job for spec in specs for job in _jobs(
            llm, spec, technique, spec.problems[: sc_limit or limit] if is_sc else spec.problems, samples, k,
            selection, embed, seed, temperature, length, stops)]  # fmt: skip
        began = time.perf_counter()
        outs = llm.generate([j[2] for j in jobs], [j[3] for j in jobs], use_tqdm=progress)
        seconds[technique] = round(time.perf_counter() - began, 1)
        pooled: dict[int, list[tuple[Cell, list[bool], list[float]]]] = {}
        for spec in specs:
            mine = [(j, o) for j, o in zip(jobs, outs, strict=True) if j[0] is spec]
            if not mine:
                skipped.append(f"{spec.name}/{technique}")
                continue
            groups = [mine[i : i + samples] for i in range(0, len(mine), samples)]
            (job, out) = groups[0][0]
            examples.append({"task": spec.name, "technique": technique, "question": job[1].question,
                             "gold": job[1].answer, "reply": out.text})  # fmt: skip
            for n_votes in sc_samples if is_sc else [1]:
                cell, verdicts, margins = _score(spec, technique, groups, n_votes)
                cells.append(cell)
                pooled.setdefault(n_votes, []).append((cell, verdicts, margins))
        if len(pooled.get(1 if not is_sc else sc_samples[0], [])) > 1:
            cells += [_pooled(technique, parts) for parts in pooled.values()]
    config = {"tasks": list(tasks), "techniques": list(techniques), "limit": limit, "k": k,
              "selection": selection, "sc_samples": list(sc_samples), "sc_limit": sc_limit or limit,
              "temperature": temperature, "max_tokens": max_tokens, "cot_max_tokens": cot_max_tokens,
              "seed": seed, "seconds": round(time.perf_counter() - start, 1),
              "technique_seconds": seconds, "skipped": skipped}  # fmt: skip
    return {"cells": [asdict(c) for c in cells], "config": config, "examples": examples}


def format_cells(result: dict[str, Any]) -> str:
    """A plain-text table: task, technique, N, accuracy [95% CI], n, unparsed, tokens per correct."""
    head = f"{'task':<11} {'technique':<17} {'N':>3} {'acc':>6} {'95% CI':>15} {'n':>4} {'unparsed':>8} " \
           f"{'gen tok/correct':>15} {'all tok/correct':>15}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for c in result["cells"]:
        lo, hi = c["ci95"]
        gen = "-" if c["gen_tokens_per_correct"] is None else f"{c['gen_tokens_per_correct']:.0f}"
        tot = "-" if c["tokens_per_correct"] is None else f"{c['tokens_per_correct']:.0f}"
        lines.append(f"{c['task']:<11} {c['technique']:<17} {c['samples']:>3} {c['accuracy']:>6.3f} "
                     f"{f'[{lo:.3f}, {hi:.3f}]':>15} {c['n']:>4} {c['unparsed']:>8} {gen:>15} {tot:>15}")  # fmt: skip
    return "\n".join(lines)


# A person record, the shape the task suite's ``json`` task asks for.
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _person_ok(value: Any) -> bool:
    return isinstance(value, dict) and sorted(value) == ["age", "name"] and isinstance(value["name"], str) \
        and isinstance(value["age"], int) and not isinstance(value["age"], bool)  # fmt: skip


def evaluate_json(llm: LLM, limit: int = 50, max_tokens: int = 64) -> dict[str, Any]:
    """The task suite's ``json`` prompts, greedy, with and without the schema constraint: the rate of replies
    that are not JSON, that are JSON but miss :data:`PERSON_SCHEMA`, and that hold the right values."""
    records = make_test_set(limit, tasks=["json"])
    prompts = [build("zero", r["prompt"]).messages for r in records]
    rows = {}
    for constrained in (False, True):
        replies = generate_json(
            llm, prompts, PERSON_SCHEMA, constrained, SamplingParams(max_tokens=max_tokens)
        )
        n = len(replies)
        not_json = sum(r.error is not None for r in replies)
        off_schema = sum(r.error is None and not _person_ok(r.value) for r in replies)
        right = sum(r.value == json.loads(rec["answer"]) for r, rec in zip(replies, records, strict=True))
        failures = not_json + off_schema
        rows["constrained" if constrained else "free"] = {
            "n": n,
            "parse_failure_rate": round(failures / n, 4),
            "parse_failure_ci95": [round(x, 4) for x in wilson_interval(failures, n)],
            "not_json": not_json,
            "off_schema": off_schema,
            "correct": right,
            "mean_tokens": round(sum(r.tokens for r in replies) / n, 1),
            "example": replies[0].text if replies else "",
        }
    return rows
