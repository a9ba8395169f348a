"""HumanEval: complete each function, run its unit tests in the sandbox, report pass@k.

The prompt is the problem's code (signature and docstring); generation stops at a new top-level block
(``"\\nclass"``, ``"\\ndef"``, ``"\\n#"``, ``"\\nif"``, ``"\\nprint"``, as in Codex's evaluation). The program run
is ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)"``; it passes when it exits with status 0
(:mod:`llmlab.eval.sandbox`). With ``n`` samples per problem (greedy when ``n == 1``, else temperature 0.8),
pass@k is Chen et al.'s unbiased estimator averaged over problems (:func:`llmlab.eval.metrics.pass_at_k`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from llmlab.eval.metrics import mean_stderr, pass_at_k
from llmlab.eval.records import EVAL_ASSETS, MalformedRecord, read_json_records
from llmlab.eval.sandbox import Limits, isolation, run_program

HUMANEVAL_FILE = EVAL_ASSETS / "HumanEval.jsonl.gz"
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
KEYS = ("task_id", "prompt", "entry_point", "test")


def load_problems() -> tuple[list[tuple[str, dict[str, str]]], list[MalformedRecord]]:
    recs, bad = read_json_records(HUMANEVAL_FILE)
    good, bad = [], list(bad)
    for where, rec in recs:
        if not isinstance(rec, dict) or any(not isinstance(rec.get(k), str) for k in KEYS):
            bad.append(MalformedRecord(where, f"needs string fields {', '.join(KEYS)}"))
        else:
            good.append((where, rec))
    return good, bad


def program(problem: dict[str, str], completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def check_completions(
    problems: list[dict[str, str]],
    completions: list[list[str]],
    limits: Limits | None = None,
    workers: int = 2,
) -> list[list[bool]]:
    """Whether each completion passes its problem's tests (each in its own sandboxed subprocess)."""
    jobs = [
        (i, program(p, c)) for i, (p, cs) in enumerate(zip(problems, completions, strict=True)) for c in cs
    ]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: run_program(job[1], limits).passed, jobs))
    out: list[list[bool]] = [[] for _ in problems]
    for (i, _), ok in zip(jobs, results, strict=True):
        out[i].append(ok)
    return out


def humaneval_metrics(passed: list[list[bool]], ks: tuple[int, ...] = (1, 10, 100)) -> dict[str, Any]:
    """``pass@k`` (and its stderr over problems) for every ``k`` up to the samples per problem."""
    n = min(len(p) for p in passed)
    out: dict[str, Any] = {}
    for k in ks:
        if k > n:
            continue
        per = [pass_at_k(len(p), sum(p), k) for p in passed]
        out[f"pass@{k}"] = sum(per) / len(per)
        out[f"pass@{k}_stderr"] = mean_stderr(per)
    out["isolation"] = isolation()
    return out
