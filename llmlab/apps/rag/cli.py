"""``llmlab rag index DIR --out INDEX``, ``llmlab rag ask INDEX "question" --model MODEL [--json]``,
``llmlab rag eval``.

Import-light: the embedder, the index libraries and torch load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llmlab.errors import DataError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rag",
        help="retrieval-augmented generation: index documents, ask with citations, evaluate",
        description="Index a folder of text/markdown/HTML, answer questions from it with cited sources, "
        "and evaluate retrieval and answers. Run 'llmlab rag COMMAND --help'.",
    )
    sub = parser.add_subparsers(dest="rag_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: _help(parser))

    p = sub.add_parser("index", help="index (or re-index, incrementally) a directory of documents")
    p.add_argument("dir", metavar="DIR", help="folder of .txt/.md/.html files (searched recursively)")
    p.add_argument("--out", required=True, metavar="INDEX", help="index directory to create or update")
    p.add_argument("--strategy", default="sentence", choices=["fixed", "sentence", "parent"], help="chunking")
    p.add_argument("--chunk-size", type=int, default=96, help="chunk size in tokens (default 96)")
    p.add_argument("--overlap", type=int, default=16, help="overlap in tokens (default 16)")
    p.add_argument(
        "--parent-size", type=int, default=384, help="parent size, --strategy parent (default 384)"
    )
    p.add_argument(
        "--vector-index", default="faiss-flat", choices=["faiss-flat", "usearch"], help="dense index"
    )
    p.add_argument("--json", action="store_true", help="print the indexing stats as JSON")
    p.set_defaults(func=_index)

    p = sub.add_parser("ask", help="answer a question from an index, citing numbered sources")
    p.add_argument("index", metavar="INDEX", help="index directory (from 'llmlab rag index')")
    p.add_argument("question", help="the question")
    p.add_argument(
        "--model", required=True, help="llmlab checkpoint, run dir, HF dir, .gguf file or 'smollm2'"
    )
    p.add_argument("--k", type=int, default=4, help="sources given to the model (default 4)")
    p.add_argument("--mode", default="hybrid", choices=["bm25", "dense", "hybrid"], help="retrieval")
    p.add_argument("--rerank", action="store_true", help="rerank by the model's yes/no log-probability")
    p.add_argument("--expand", default=None, choices=["rewrite", "multi", "hyde"], help="query expansion")
    p.add_argument("--max-tokens", type=int, default=96, help="answer length limit (default 96)")
    p.add_argument("--json", action="store_true", help="print answer, citations, unsupported as JSON")
    p.set_defaults(func=_ask)

    p = sub.add_parser("eval", help="retrieval recall/MRR, answer EM/F1 with and without retrieval")
    p.add_argument("--model", default="smollm2", help="model to answer with (default smollm2)")
    p.add_argument("--work", default="runs/rag_eval", help="where the eval corpora and indexes go")
    p.add_argument("--limit", type=int, default=None, help="use only the first N questions of each set")
    p.add_argument("--answer-limit", type=int, default=40, help="questions answered per set (default 40)")
    p.add_argument("--rerank-limit", type=int, default=20, help="questions reranked by the LLM (default 20)")
    p.add_argument("--calibrate", action="store_true", help="recalibrate the support thresholds (asset)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the full report as JSON")
    p.set_defaults(func=_eval)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _index(args: argparse.Namespace) -> int:
    from llmlab.apps.embeddings import load_embedder
    from llmlab.apps.rag.chunking import ChunkConfig
    from llmlab.apps.rag.ingest import ingest_dir
    from llmlab.apps.rag.store import build_index

    config = ChunkConfig(args.strategy, args.chunk_size, args.overlap, args.parent_size)
    report = ingest_dir(args.dir)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(report.skipped.items())) or "none"
    if not report.files:
        raise DataError(f"{args.dir}: no readable .txt/.md/.html files to index (skipped: {skipped})")
    stats = build_index(args.dir, args.out, load_embedder(), config, args.vector_index, report=report)
    if args.json:
        print(json.dumps(stats.to_dict()))
    else:
        print(
            f"indexed {args.dir} -> {args.out}: {stats.added} new/changed, {stats.unchanged} unchanged, "
            f"{stats.removed} removed files; {stats.chunks} chunks ({stats.embedded} embedded) in "
            f"{stats.seconds:.1f}s; skipped: {skipped}"
        )
    for reason in ("escaping_symlink", "unreadable"):
        for path in report.skipped_paths.get(reason, [])[:5]:
            print(f"  skipped ({reason}): {path}", file=sys.stderr)
    return 0


def _ask(args: argparse.Namespace) -> int:
    from llmlab.apps.rag.answer import answer_question
    from llmlab.apps.rag.search import open_index
    from llmlab.infer import LLM

    index = open_index(args.index)  # fails fast, before the model loads
    llm = LLM(args.model, max_batch_size=16)
    result = answer_question(
        llm, index, args.question, k=args.k, mode=args.mode, max_tokens=args.max_tokens,
        expand=args.expand, rerank=args.rerank,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
        return 0
    print(result.answer)
    print()
    for i, h in enumerate(result.hits, start=1):
        print(f"[{i}] {h.source}:{h.span[0]}-{h.span[1]}")
    for sentence in result.unsupported:
        print(f"unsupported: {sentence}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from llmlab.apps.rag.evaluate import format_report, run_eval

    report = run_eval(
        args.model, Path(args.work), limit=args.limit, answer_limit=args.answer_limit,
        rerank_limit=args.rerank_limit,
        calibrate_support=args.calibrate,
    )  # fmt: skip
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
