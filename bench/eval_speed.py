"""Evaluation speed, in one run, on SmolLM2-135M (fp32, this CPU):

1. ARC-Easy zero-shot log-likelihood scoring: llmlab (prefix trees: the question once, each choice's own
   tokens after it) against the peers that score one padded row per (question, choice) request, lm-eval's
   way: lm-eval 0.4.13 itself with its HF backend (bench venv, subprocess; its own
   ``total_evaluation_time_seconds``, which includes its model load) and a plain transformers scorer in this
   process (16 requests per forward, length-sorted, as lm-eval batches). Scores must be identical.
2. GSM8K generation (0-shot chat, greedy, 128 new tokens) through ``llmlab.LLM``: continuous batching
   against one request at a time.

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/eval_speed.py [--limit N] [--no-lm-eval]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from llmlab.eval import evaluate
from llmlab.eval.gen_tasks import GEN_BUILDERS
from llmlab.eval.loglik import encode_requests, score_groups
from llmlab.eval.mc_tasks import MC_BUILDERS
from llmlab.eval.metrics import mc_scores
from llmlab.infer import LLM, SamplingParams
from llmlab.loading import load

BENCH = Path("/root/.cache/llmlab-bench")
sys.path.insert(0, str(Path(__file__).parent))
from lm_eval_compare import run_lm_eval, write_tasks  # noqa: E402


def transformers_scorer(hf_dir: str, limit: int | None) -> tuple[dict, float]:
    """One padded row per request through transformers, 16 requests per forward (lm-eval's batching)."""
    from transformers import AutoModelForCausalLM  # the peer: imported only for this measurement

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    _, tok = load(hf_dir)
    docs = MC_BUILDERS["arc_easy"]()[0][:limit]
    flat = encode_requests(tok, [p for d in docs for p in d.requests])
    t0 = time.perf_counter()
    scores, _ = score_groups(model, [[r] for r in flat], batch_size=16)  # each request on its own row
    seconds = time.perf_counter() - t0
    lls, pos, acc, acc_norm = [s[0][0] for s in scores], 0, 0.0, 0.0
    for d in docs:
        m = mc_scores(lls[pos : pos + len(d.requests)], d.choices, d.gold)
        acc, acc_norm, pos = acc + m["acc"], acc_norm + m["acc_norm"], pos + len(d.requests)
    return {"acc": acc / len(docs), "acc_norm": acc_norm / len(docs), "requests": len(flat)}, seconds


def generation_throughput(model_path: str, n: int) -> dict:
    docs = GEN_BUILDERS["gsm8k"](0, True)[0][:n]
    params = SamplingParams(temperature=0.0, max_tokens=128, stop=["Question:"])
    out = {}
    for name, batch in (("batched", 16), ("one_at_a_time", 1)):
        llm = LLM(model_path, max_batch_size=batch)
        llm.generate([docs[0].prompt], SamplingParams(max_tokens=4))  # warm-up
        t0 = time.perf_counter()
        if batch == 1:
            outs = [llm.generate([d.prompt], params)[0] for d in docs]
        else:
            outs = llm.generate([d.prompt for d in docs], params)
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for o in outs)
        out[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                     "texts": [o.text for o in outs]}  # fmt: skip
    out["same_text"] = out["batched"].pop("texts") == out["one_at_a_time"].pop("texts")
    out["speedup"] = out["batched"]["tokens_per_s"] / out["one_at_a_time"]["tokens_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(BENCH / "smollm2-hf"), help="HF dir of SmolLM2-135M(-Instruct)")
    ap.add_argument("--limit", type=int, default=None, help="first N ARC-Easy questions (default: all 2376)")
    ap.add_argument("--gen-requests", type=int, default=16)
    ap.add_argument("--no-lm-eval", action="store_true", help="skip the lm-eval subprocess")
    ap.add_argument("--lmeval-python", default=str(BENCH / "lmeval-venv" / "bin" / "python"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    report: dict = {"limit": args.limit, "threads": torch.get_num_threads()}

    model, tok = load(args.model)
    t0 = time.perf_counter()
    ours = evaluate(model, tasks=["arc_easy"], limit=args.limit, tokenizer=tok, batch_size=16, progress=False)
    llmlab_s = time.perf_counter() - t0
    res = ours["results"]["arc_easy"]
    report["llmlab"] = {"acc": res["acc"], "acc_norm": res["acc_norm"], "seconds": llmlab_s}
    print(f"llmlab        acc {res['acc']:.4f} acc_norm {res['acc_norm']:.4f}  {llmlab_s:7.1f}s")
    del model

    plain, plain_s = transformers_scorer(args.model, args.limit)
    report["transformers_one_row_per_request"] = {**plain, "seconds": plain_s}
    print(f"transformers  acc {plain['acc']:.4f} acc_norm {plain['acc_norm']:.4f}  {plain_s:7.1f}s "
          f"({plain['requests']} requests) -> llmlab {plain_s / llmlab_s:.2f}x faster")  # fmt: skip

    if not args.no_lm_eval and os.path.exists(args.lmeval_python):
        work = BENCH / "eval_speed"
        write_tasks(work / "tasks")
        theirs, wall = run_lm_eval(args.lmeval_python, args.model, ["arc_easy"], args.limit or 100000,
                                   work / "tasks", work / "out", 16)  # fmt: skip
        lm = theirs["results"]["lc_arc_easy"]
        lm_s = float(theirs.get("total_evaluation_time_seconds", wall))
        report["lm_eval_hf"] = {
            "acc": lm["acc,none"],
            "acc_norm": lm["acc_norm,none"],
            "seconds": lm_s,
            "wall": wall,
        }
        print(f"lm-eval (hf)  acc {lm['acc,none']:.4f} acc_norm {lm['acc_norm,none']:.4f}  {lm_s:7.1f}s "
              f"(its total_evaluation_time, incl. model load) -> llmlab {lm_s / llmlab_s:.2f}x faster")  # fmt: skip

    gen = generation_throughput(args.model, args.gen_requests)
    report["gsm8k_generation"] = gen
    print(f"GSM8K generation, {args.gen_requests} requests x <=128 tokens: batched "
          f"{gen['batched']['tokens_per_s']:.1f} tok/s, one at a time {gen['one_at_a_time']['tokens_per_s']:.1f} "
          f"tok/s -> {gen['speedup']:.2f}x (same text: {gen['same_text']})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
