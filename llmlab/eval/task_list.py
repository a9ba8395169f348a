"""The task registry: every task's kind, metrics, size and source (torch-free, so ``llmlab eval list`` is fast)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmlab.errors import ConfigError


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str  # "mc" (log-likelihood), "generate" (exact match), "code" (pass@k)
    metrics: tuple[str, ...]
    size: int  # records in the bundled file (MMLU: test questions over 57 subjects)
    source: str
    shots: str = "0"


_CS = "LLM-Adapters repackaging (ODC-By)"
TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        TaskInfo("arc_easy", "mc", ("acc", "acc_norm"), 2376, f"ARC-Easy test, {_CS}; ARC CC BY-SA 4.0"),
        TaskInfo(
            "arc_challenge", "mc", ("acc", "acc_norm"), 1172, f"ARC-Challenge test, {_CS}; CC BY-SA 4.0"
        ),
        TaskInfo("piqa", "mc", ("acc", "acc_norm"), 1838, f"PIQA dev, {_CS}; AFL-3.0"),
        TaskInfo("boolq", "mc", ("acc",), 3270, f"BoolQ dev without passages, {_CS}; CC BY-SA 3.0"),
        TaskInfo("winogrande", "mc", ("acc",), 1267, f"WinoGrande dev (partial scoring), {_CS}; CC BY"),
        TaskInfo("openbookqa", "mc", ("acc", "acc_norm"), 500, f"OpenBookQA test, {_CS}; Apache-2.0"),
        TaskInfo("social_iqa", "mc", ("acc",), 1954, f"Social IQa dev, {_CS}; CC BY 4.0"),
        TaskInfo(
            "mmlu", "mc", ("acc", "acc_micro"), 14042, "MMLU test, dev 5-shot (Hendrycks et al.; MIT)", "5"
        ),
        TaskInfo("truthfulqa_mc1", "mc", ("acc",), 817, "TruthfulQA CSV (Apache-2.0), 6-shot preamble", "6"),
        TaskInfo("truthfulqa_mc2", "mc", ("acc",), 817, "TruthfulQA CSV (Apache-2.0), 6-shot preamble", "6"),
        TaskInfo(
            "gsm8k",
            "generate",
            ("exact_match", "exact_match_strict", "exact_match_flexible"),
            1319,
            "GSM8K test (MIT); exemplars from GSM8K train",
            "5 (0 with --chat)",
        ),  # fmt: skip
        TaskInfo("svamp", "generate", ("exact_match",), 1000, f"SVAMP, {_CS}; MIT"),
        TaskInfo("multiarith", "generate", ("exact_match",), 600, f"MultiArith, {_CS}"),
        TaskInfo("addsub", "generate", ("exact_match",), 395, f"AddSub, {_CS}"),
        TaskInfo("singleeq", "generate", ("exact_match",), 508, f"SingleEq, {_CS}"),
        TaskInfo("mawps", "generate", ("exact_match",), 238, f"MAWPS, {_CS}"),
        TaskInfo("aqua", "generate", ("exact_match",), 254, f"AQuA-RAT (letter), {_CS}; Apache-2.0"),
        TaskInfo(
            "task_suite",
            "generate",
            ("exact_match", "format_ok"),
            180,
            "llmlab's verifiable tasks (llmlab.data.tasks), held-out split, chat prompts",
        ),  # fmt: skip
        TaskInfo("humaneval", "code", ("pass@1", "pass@10"), 164, "OpenAI HumanEval (MIT), sandboxed"),
    )
}


def check_task_names(tasks: Sequence[str] | str) -> list[str]:
    """Task names as a list (a comma-separated string is split); an unknown one lists the known ones."""
    names = (
        [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    )
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"no task given (known tasks: {', '.join(TASKS)})")
    for n in names:
        if n not in TASKS:
            raise ConfigError(f"unknown task {n!r} (known tasks: {', '.join(TASKS)})")
    return names


def format_task_list() -> str:
    lines = [f"{'task':<16} {'kind':<9} {'records':>7}  {'shots':<18} {'metrics':<54} source"]
    for t in TASKS.values():
        lines.append(
            f"{t.name:<16} {t.kind:<9} {t.size:>7}  {t.shots:<18} {', '.join(t.metrics):<54} {t.source}"
        )
    return "\n".join(lines)
