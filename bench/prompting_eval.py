"""Prompting techniques measured (issue 19 section 1): zero-shot vs few-shot vs chain of thought vs
self-consistency (N = 1, 5, 10) on the shipped math word problems and the task suite, with 95% Wilson
intervals and tokens per correct answer; plus the JSON parse-failure rate with and without constrained
decoding. The baseline of every row is the zero-shot row of the same model and task, in the same run.

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/prompting_eval.py \
        [--model smollm2 --int8] [--model /tmp/llmlab-runs/demo/sft/final] [--limit 40] [--sc-limit 20]

Each model runs in a fresh engine; results go to ``--out`` (JSON) and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from llmlab.apps.prompting.evaluate import (
    MATH_TASKS,
    evaluate_json,
    evaluate_prompting,
    format_cells,
)
from llmlab.infer import LLM
from llmlab.loading import resolve_model_path


def markdown(name: str, result: dict[str, Any]) -> str:
    lines = [
        f"**{name}** (greedy; self-consistency T={result['config']['temperature']}, "
        f"{result['config']['seconds']:.0f} s)",
        "",
        "| task | technique | N | accuracy | 95% CI | n | unparsed | gen tok / correct | all tok / correct |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        lo, hi = c["ci95"]
        gen = "—" if c["gen_tokens_per_correct"] is None else f"{c['gen_tokens_per_correct']:.0f}"
        tot = "—" if c["tokens_per_correct"] is None else f"{c['tokens_per_correct']:.0f}"
        lines.append(f"| {c['task']} | {c['technique']} | {c['samples']} | {c['accuracy']:.3f} | "
                     f"[{lo:.3f}, {hi:.3f}] | {c['n']} | {c['unparsed']} | {gen} | {tot} |")  # fmt: skip
    if "json_task" in result:
        lines += ["", "| JSON task | n | parse failures | 95% CI | not JSON | off-schema | correct |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for mode, row in result["json_task"].items():
            lo, hi = row["parse_failure_ci95"]
            lines.append(f"| {mode} | {row['n']} | {row['parse_failure_rate']:.3f} | [{lo:.3f}, {hi:.3f}] | "
                         f"{row['not_json']} | {row['off_schema']} | {row['correct']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=None, help="model (repeatable; default smollm2)")
    p.add_argument("--int8", action="store_true", help="int8 fused decode path (else the fp32 fused path)")
    p.add_argument("--tasks", default=",".join(MATH_TASKS), help="comma list (math tasks and/or task_suite)")
    p.add_argument("--techniques", default="zero,fewshot,cot,fewshot-cot,self-consistency")
    p.add_argument("--limit", type=int, default=40, help="questions per task (default 40)")
    p.add_argument("--sc-limit", type=int, default=20, help="questions per task for self-consistency (20)")
    p.add_argument("--n", default="1,5,10", help="self-consistency sample counts")
    p.add_argument("--k", type=int, default=4, help="few-shot exemplars (default 4)")
    p.add_argument("--json-limit", type=int, default=50, help="JSON task prompts (default 50; 0: skip)")
    p.add_argument("--cot-max-tokens", type=int, default=160)
    p.add_argument("--max-batch-size", type=int, default=48)
    p.add_argument("--out", default="/tmp/prompting_eval.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = {}
    for model in args.model or ["smollm2"]:
        start = time.perf_counter()
        llm = LLM(resolve_model_path(model), max_batch_size=args.max_batch_size, kv_cache_mb=1536.0,
                  enable_prefix_caching=True, fast="int8" if args.int8 else True)  # fmt: skip
        load_s = time.perf_counter() - start
        result: dict[str, Any] = {"cells": [], "examples": [], "config": {}}
        if args.json_limit:  # first: cheap, and the constrained-decoding figure
            result["json_task"] = evaluate_json(llm, args.json_limit)
        for technique in args.techniques.split(","):  # one at a time: a run cut short keeps what it measured
            part = evaluate_prompting(
                llm, args.tasks.split(","), [technique], limit=args.limit, k=args.k,
                sc_samples=[int(n) for n in args.n.split(",")], sc_limit=args.sc_limit,
                cot_max_tokens=args.cot_max_tokens, progress=True,
            )  # fmt: skip
            seconds = {**result["config"].get("technique_seconds", {}), **part["config"]["technique_seconds"]}
            result.update(cells=result["cells"] + part["cells"], examples=result["examples"] + part["examples"],
                          config={**part["config"], "techniques": args.techniques.split(","), "model": model,
                                  "technique_seconds": seconds, "seconds": round(sum(seconds.values()), 1)})  # fmt: skip
            results[model] = result
            Path(args.out).write_text(json.dumps(results, indent=2))
            print(format_cells(part), flush=True)
        result["config"].update(model=model, int8=args.int8, load_seconds=round(load_s, 1),
                                generated_tokens=llm.stats["generation_tokens_total"])  # fmt: skip
        results[model] = result
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(markdown(f"{model}{' (int8)' if args.int8 else ''}", result), flush=True)
        del llm
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
