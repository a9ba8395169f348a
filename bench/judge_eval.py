"""RLAIF judge and Constitutional AI on SmolLM2-135M-Instruct (issue 21 section 2), in one run:

1. the judge (:mod:`llmlab.apps.judge`, both orders) against ground truth: the task suite's verifier-built
   pairs, GSM8K correct-vs-incorrect solutions, hh-rlhf harmless human labels (held-out part): agreement with
   its 95% Wilson interval, single-order agreement, self-agreement under the swap, first-position rate;
2. critique -> revise (:mod:`llmlab.apps.constitutional`) on hh-rlhf harmless prompts: pairs kept, tokens
   generated per pair, and how often the judge prefers the revision to the original.

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/judge_eval.py [--limit 60] [--cai 16] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from llmlab.align.data import load_pairs
from llmlab.apps.constitutional import critique_revise
from llmlab.apps.judge import Judge, agreement, summarize
from llmlab.infer import LLM
from llmlab.loading import resolve_model_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="judge (and CAI policy) model")
    p.add_argument("--limit", type=int, default=60, help="pairs per ground-truth set (default 60)")
    p.add_argument("--cai", type=int, default=16, help="hh-rlhf prompts through critique -> revise (16)")
    p.add_argument("--out", default="/tmp/judge_eval.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter(
        "ignore"
    )  # gsm8k-pairs warns that its prompts are GSM8K test: known, not trained on
    llm = LLM(resolve_model_path(args.model), max_batch_size=32, kv_cache_mb=1536.0)
    judge = Judge(llm)
    result: dict = {"model": args.model, "judge": {}}
    for name in ("tasks", "gsm8k-pairs", "hh-rlhf-heldout"):
        start = time.perf_counter()
        result["judge"][name] = {**agreement(judge, load_pairs(name, limit=args.limit)),
                                 "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        print(name, result["judge"][name], flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.cai:
        prompts = [pair.prompt for pair in load_pairs("hh-rlhf-heldout", limit=args.cai)]
        start = time.perf_counter()
        cai = critique_revise(llm, prompts, max_tokens=96, seed=0)
        kept = cai["pairs"]
        verdict = (summarize(judge.compare([r["prompt"] for r in kept], [r["chosen"] for r in kept],
                                           [r["rejected"] for r in kept]), [True] * len(kept))
                   if kept else None)  # fmt: skip
        result["cai"] = {**cai["stats"], "judge_prefers_revision": verdict,
                         "seconds": round(time.perf_counter() - start, 1), "examples": cai["records"][:3]}  # fmt: skip
        print("cai", {k: v for k, v in result["cai"].items() if k != "examples"}, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
