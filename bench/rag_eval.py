"""RAG evaluation as a benchmark: `llmlab rag eval` plus a markdown table for BENCHMARKS.md.

    flock /tmp/llmlab-heavy.lock python bench/rag_eval.py --model smollm2 --work runs/rag_eval --json runs/rag_eval.json

Retrieval (BM25 vs dense vs hybrid vs hybrid + LLM rerank) on the 140-question real cloze set, and answers
with and without retrieval on the real and the synthetic invented-entity sets, in one run on one model, so
the rows compare like with like. The first run builds the two indexes (a few minutes on 2 cores); later
runs reuse them.

``--expansions`` measures LLM query expansion instead (rewrite, multi-query, HyDE vs the plain question) for
dense and hybrid retrieval on the real set, full and short cloze questions; each expansion is generated once,
batched, and its amortized cost is in ms/query; single-query latency is timed unbatched on a few questions:

    flock /tmp/llmlab-heavy.lock python bench/rag_eval.py --expansions --limit 70 --work runs/rag_eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmlab.apps.embeddings import load_embedder
from llmlab.apps.rag import qaset
from llmlab.apps.rag.evaluate import expansion_retrieval, format_report, run_eval, single_query_ms
from llmlab.apps.rag.query import EXPANSIONS
from llmlab.apps.rag.search import MODES, open_index
from llmlab.apps.rag.store import build_index
from llmlab.infer import LLM
from llmlab.loading import resolve_model_path


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


def expansion_report(
    model: str, work: Path, limit: int, latency_n: int, variants: list[str], out: str | None
) -> dict:
    embedder = load_embedder()
    build_index(qaset.write_eval_corpus(work / "real_corpus"), work / "real.index", embedder)  # incremental
    index = open_index(work / "real.index", embedder)
    llm = LLM(resolve_model_path(model), max_batch_size=48, enable_prefix_caching=True)
    items = qaset.load_qa()[:limit]
    report: dict = {"model": model, "questions": len(items), "rows": []}
    for variant in variants:  # full cloze sentence, or its short 4-words-each-side window
        asked = [{**it, "question": it[variant]} for it in items]
        for how in (None, *EXPANSIONS):
            row = {"variant": variant, "expansion": how or "none",
                   **expansion_retrieval(index, asked, llm, how)}  # fmt: skip
            if latency_n:
                row["single_query_ms_hybrid"] = single_query_ms(index, asked[:latency_n], llm, how)
            report["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
            if out:  # after every row: a run cut short keeps what it measured
                Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def expansion_markdown(report: dict) -> str:
    lines = [
        "| questions | expansion | mode | recall@1 | recall@5 | recall@10 | MRR | ms/query (batched) "
        "| single query, ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        for mode in ("dense", "hybrid"):
            m = row[mode]
            single = (
                f"{row['single_query_ms_hybrid']:.0f}"
                if mode == "hybrid" and "single_query_ms_hybrid" in row
                else ""
            )
            lines.append(
                f"| {row['variant']} | {row['expansion']} | {mode} | {m['recall@1']:.3f} | {m['recall@5']:.3f} "
                f"| {m['recall@10']:.3f} | {m['mrr']:.3f} | {m['ms_per_query']:.0f} | {single} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--work", default="runs/rag_eval")
    parser.add_argument("--answer-limit", type=int, default=40)
    parser.add_argument("--rerank-limit", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--expansions", action="store_true", help="query rewriting / multi-query / HyDE only")
    parser.add_argument("--limit", type=int, default=140, help="real questions for --expansions")
    parser.add_argument("--latency-n", type=int, default=3, help="questions timed unbatched per expansion")
    parser.add_argument("--variants", default="question,short_question")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    if args.expansions:
        report = expansion_report(args.model, Path(args.work), args.limit, args.latency_n,
                                  args.variants.split(","), args.json)  # fmt: skip
        print(expansion_markdown(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return
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
