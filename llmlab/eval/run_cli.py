"""``llmlab eval run`` (benchmark tasks), ``llmlab eval list`` (the task registry) and ``llmlab eval winrate``.

Heavy imports (torch, the harness) happen inside the handlers, so ``llmlab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register_eval(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="benchmark tasks (lm-eval-compatible MC, GSM8K and math, HumanEval, the task suite)",
        description="Evaluate MODEL (llmlab dir, HF dir, .gguf, quantized dir, run dir or 'smollm2') on bundled "
        "tasks, with lm-evaluation-harness's definitions. Prints a table (task, metric, value, ± stderr, n).",
    )
    run.add_argument("model", metavar="MODEL", help="model path or 'smollm2'")
    run.add_argument("--tasks", required=True, help="comma-separated task names (see 'llmlab eval list')")
    run.add_argument("--shots", type=int, default=None, help="few-shot exemplars (default: each task's own)")
    run.add_argument("--limit", type=int, default=None, help="evaluate the first N records of each task")
    run.add_argument("--chat", action="store_true", help="send generative prompts through the chat template")
    run.add_argument("--batch-size", type=int, default=16, help="questions per forward / engine batch (16)")
    run.add_argument("--samples", type=int, default=1, help="HumanEval completions per problem (pass@k)")
    run.add_argument("--adapter", default=None, help="a LoRA adapter directory applied on the model")
    run.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=run_tasks)

    lst = sub.add_parser(
        "list", help="list the evaluation tasks", description="Every task: kind, size, metrics."
    )
    lst.add_argument("--json", action="store_true", help="print the registry as JSON")
    lst.set_defaults(func=list_tasks)

    win = sub.add_parser(
        "winrate",
        help="win rate of model A over model B judged by a reward model (both orders, length-controlled)",
        description="Generate answers with MODEL_A and MODEL_B on held-out prompts, score both with a reward "
        "model, and report the raw and length-controlled win rate of A over B with a 95% bootstrap CI.",
    )
    win.add_argument("model_a", metavar="MODEL_A")
    win.add_argument("model_b", metavar="MODEL_B")
    win.add_argument("--judge", required=True, help="reward model directory (llmlab align rm output)")
    win.add_argument("--prompts", default="vicuna", help="vicuna, mt_bench or alpaca_eval (default vicuna)")
    win.add_argument("--limit", type=int, default=None, help="first N prompts")
    win.add_argument("--max-tokens", type=int, default=128, help="new tokens per answer (128)")
    win.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    win.set_defaults(func=run_winrate)


def run_tasks(args: argparse.Namespace) -> int:
    from llmlab.eval.harness import evaluate, format_table

    result = evaluate(
        args.model,
        tasks=args.tasks,
        limit=args.limit,
        shots=args.shots,
        batch_size=args.batch_size,
        chat=args.chat,
        progress=not args.no_progress,
        adapter=args.adapter,
        samples=args.samples,
    )
    print(format_table(result))
    if "humaneval" in result["results"]:
        print(f"humaneval sandbox isolation: {result['results']['humaneval']['isolation']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def list_tasks(args: argparse.Namespace) -> int:
    from llmlab.eval.task_list import TASKS, format_task_list

    if args.json:
        print(json.dumps({n: {"kind": t.kind, "metrics": t.metrics, "size": t.size, "source": t.source}
                          for n, t in TASKS.items()}, indent=2))  # fmt: skip
    else:
        print(format_task_list())
    return 0


def run_winrate(args: argparse.Namespace) -> int:
    from llmlab.eval.judging import format_winrate, winrate

    result = winrate(args.model_a, args.model_b, judge=args.judge, prompts=args.prompts, limit=args.limit,
                     max_tokens=args.max_tokens)  # fmt: skip
    print(format_winrate(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
