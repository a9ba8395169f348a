"""RAG evaluation as a benchmark: `llmlab rag eval` plus a markdown table for BENCHMARKS.md.

    flock /tmp/llmlab-heavy.lock python bench/rag_eval.py --model smollm2 --work runs/rag_eval --json runs/rag_eval.json

Retrieval (BM25 vs dense vs hybrid vs hybrid + LLM rerank) on the 140-question real cloze set, and answers
with and without retrieval on the real and the synthetic invented-entity sets, in one run on one model, so
the rows compare like with like. The first run builds the two indexes (a few minutes on 2 cores); later
runs reuse them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmlab.apps.rag.evaluate import format_report, run_eval
from llmlab.apps.rag.search import MODES


def markdown(report: dict) -> str:
    r = report["real"]
    n = r["reranked"]["questions"]
    lines = [
        "| retrieval | recall@1 | recall@5 | recall@10 | MRR | ms/query |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(m, r[m]) for m in MODES] + [(f"{m}, short cloze", r[f"{m}_short"]) for m in MODES]
    rows.append((f"hybrid, first {n}", r["hybrid_on_rerank_subset"]))
    rows.append((f"hybrid + LLM yes/no rerank of top 10, first {n}", r["reranked"]))
    for name, m in rows:
        lines.append(
            f"| {name} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['recall@10']:.3f} | {m['mrr']:.3f} "
            f"| {m['ms_per_query']:.1f} |"
        )
    lines += [
        "",
        "| answers | EM | F1 | contains gold | unsupported sentences | s/question |",
        "|---|---|---|---|---|---|",
    ]
    for set_name in ("real", "synthetic"):
        s = report[set_name]
        for book in ("closed", "open"):
            a = s["answers"][f"{book}_book"]
            lines.append(
                f"| {set_name}, {book}-book | {a['em']:.3f} | {a['f1']:.3f} | {a['contains']:.3f} "
                f"| {s[f'unsupported_rate_{book}']:.3f} ({s[f'judged_sentences_{book}']} judged) "
                f"| {s['answers'][f'{book}_s_per_question']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--work", default="runs/rag_eval")
    parser.add_argument("--answer-limit", type=int, default=40)
    parser.add_argument("--rerank-limit", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    report = run_eval(
        args.model, Path(args.work), answer_limit=args.answer_limit, rerank_limit=args.rerank_limit
    )
    print(format_report(report))
    print()
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
