"""Agent evaluation: success rate and mean tool steps on generated multi-step tasks, with and without tools.

    HF_HUB_OFFLINE=1 flock /tmp/llmlab-heavy.lock .venv/bin/python bench/agent_eval.py --model smollm2 --n 200
    .venv/bin/python bench/agent_eval.py --write-sft traces.jsonl --n 600      # gold tool-use traces for SFT
    .venv/bin/python -m llmlab sft RUN/pretrain/final --data traces.jsonl --out /tmp/agent-sft ...
    .venv/bin/python bench/agent_eval.py --model /tmp/agent-sft/final --no-tool-definitions ...

Tasks come from :func:`llmlab.apps.agent.tasks.generate_tasks` (the ``eval`` split: seeds and entities disjoint
from the ``train`` split the SFT traces use). Lookups search a real RAG index (``llmlab.apps.rag``, BM25 mode)
built over the invented-entity corpus. Every condition runs the same tasks in one batched engine (greedy):

- ``no-tools``: one turn, the model answers directly;
- ``tools``: the native tool loop;
- ``constrained``: the native loop with every turn one grammar-constrained call (``final_answer`` ends it);
- ``react``: the ReAct text loop;
- ``plan``: plan-and-execute (one planning turn, then the native loop).

It prints success (exact at the task's precision, Wilson 95% interval), mean tool steps, finish reasons and
per-family success, and writes everything as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmlab.apps.agent import Agent, AgentConfig, EnginePolicy, make_tools  # noqa: E402
from llmlab.apps.agent.tasks import FAMILIES, generate_tasks, is_correct, sft_records, write_corpus  # noqa: E402
from llmlab.eval.metrics import wilson_interval  # noqa: E402

TOOLS = ["calculator", "unit_convert", "python", "rag_search"]
SHORT_SYSTEM = "Solve the task with tools. Reply with the final answer only."


class CorpusRetriever:
    """rag_search over a real index of the invented-entity corpus (built once into a temp dir)."""

    def __init__(self, workdir: Path):
        from llmlab.apps.agent.rag import IndexRetriever
        from llmlab.apps.rag import build_index, load_embedder

        corpus = write_corpus(workdir / "corpus")
        build_index(corpus, workdir / "index", load_embedder(), progress=False)
        self.inner = IndexRetriever(workdir / "index", mode="bm25")

    def search(self, query: str, k: int) -> list[dict]:
        return self.inner.search(query, 1)  # the best passage only: a tiny model's context is 256 tokens


def evaluate(policy, tasks, tools, config: AgentConfig, name: str) -> dict:
    start = time.perf_counter()
    results = Agent(policy, tools, config).run_many([t.question for t in tasks])
    seconds = time.perf_counter() - start
    ok = [is_correct(r.answer, t) for r, t in zip(results, tasks, strict=True)]
    lo, hi = wilson_interval(sum(ok), len(ok))
    per_family = {
        f: round(
            sum(o for o, t in zip(ok, tasks, strict=True) if t.family == f)
            / max(1, sum(t.family == f for t in tasks)),
            3,
        )
        for f in FAMILIES
    }
    row = {
        "condition": name,
        "n": len(tasks),
        "success": round(sum(ok) / len(ok), 3),
        "ci95": [round(lo, 3), round(hi, 3)],
        "mean_steps": round(sum(len(r.steps) for r in results) / len(results), 2),
        "tool_errors": sum(s.error for r in results for s in r.steps),
        "finish": dict(Counter(r.finish_reason for r in results)),
        "per_family": per_family,
        "tokens": sum(r.prompt_tokens + r.completion_tokens for r in results),
        "seconds": round(seconds, 1),
        "examples": [
            {
                "q": t.question,
                "gold": t.answer,
                "answer": r.answer[:120],
                "steps": [(s.tool, s.arguments) for s in r.steps][:3],
            }
            for r, t in list(zip(results, tasks, strict=True))[:3]
        ],
    }
    print(
        f"{name:<22} success {row['success']:.3f} [{lo:.3f}, {hi:.3f}]  mean steps {row['mean_steps']:.2f}  "
        f"tool errors {row['tool_errors']}  finish {row['finish']}  {seconds:.0f} s",
        flush=True,
    )
    print(f"{'':<22} per family {per_family}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n", type=int, default=200, help="tasks (families in turn)")
    parser.add_argument(
        "--conditions", default="no-tools,tools", help="no-tools, tools, constrained, react, plan"
    )
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument(
        "--no-tool-definitions", action="store_true", help="short system prompt, no signatures"
    )
    parser.add_argument("--write-sft", default=None, help="write N train-split gold traces (JSONL) and exit")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="agent-eval-") as tmp:
        retriever = CorpusRetriever(Path(tmp))
        tools = make_tools(TOOLS, retriever=retriever, timeout_s=5.0)
        system = SHORT_SYSTEM if args.no_tool_definitions else AgentConfig().system_prompt
        base = dict(max_steps=args.max_steps, max_tokens=args.max_tokens, system_prompt=system,
                    tool_definitions=not args.no_tool_definitions)  # fmt: skip
        if args.write_sft:  # gold runs through the real loop with the student's tokenizer and context
            from llmlab.loading import load, resolve_model_path

            model, tokenizer = load(resolve_model_path(args.model))
            context = args.max_model_len or model.cfg.max_seq_len
            train = generate_tasks(args.n, "train")
            records = sft_records(train, tools, tokenizer, context, AgentConfig(**base))
            with open(args.write_sft, "w", encoding="utf-8") as fh:
                for rec in records:
                    fh.write(json.dumps(rec) + "\n")
            print(
                f"wrote {len(records)} turns of {len(train)} gold runs (context {context}) to {args.write_sft}"
            )
            return 0
        from llmlab.infer import LLM
        from llmlab.loading import resolve_model_path

        llm = LLM(
            resolve_model_path(args.model),
            max_batch_size=32,
            enable_prefix_caching=True,
            max_model_len=args.max_model_len,
            kv_cache_mb=512,
        )
        policy = EnginePolicy(llm)
        tasks = generate_tasks(args.n, "eval")
        print(f"model {args.model}: {len(tasks)} held-out tasks, context {llm.max_model_len}", flush=True)
        rows = []
        for cond in args.conditions.split(","):
            if cond == "no-tools":
                cfg = AgentConfig(
                    **{**base, "system_prompt": "Solve the task. Reply with the final answer only."}
                )
                rows.append(evaluate(policy, tasks, [], cfg, cond))
            elif cond in ("tools", "constrained", "react", "plan"):
                mode = cond if cond in ("react", "plan") else "native"
                cfg = AgentConfig(**base, constrained=cond == "constrained", mode=mode)
                rows.append(evaluate(policy, tasks, tools, cfg, cond))
            else:
                parser.error(f"unknown condition {cond!r}")
            if args.out:  # after every condition: a run cut short keeps what it measured
                Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
