"""Which vector index for `llmlab rag`? faiss-cpu (exact flat, HNSW) vs usearch (HNSW) on our own corpus.

    python bench/rag_vector_index.py --index runs/rag_eval/real.index [--scale 20]

Reads the chunk embeddings of an index built by `llmlab rag index` / `llmlab rag eval` (the real eval corpus:
WikiText-2 articles + Gutenberg), embeds the questions of llmlab/assets/rag/qa_real.jsonl as queries, and reports
for each back-end: recall@10 against exact search (numpy), mean single-query latency, build time. ``--scale N``
adds a second table over N noisy copies of the corpus (to see where exact search starts to cost).
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path

import numpy as np


def load_vectors(index_dir: Path) -> np.ndarray:
    db = sqlite3.connect(index_dir / "index.sqlite")
    dim = int(db.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()[0])
    blobs = [r[0] for r in db.execute("SELECT vector FROM chunks ORDER BY id")]
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim).copy()


def exact_top(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ corpus.T), axis=1, kind="stable")[:, :k]


def run_backends(
    corpus: np.ndarray, queries: np.ndarray, k: int = 10
) -> list[tuple[str, float, float, float]]:
    import faiss
    from usearch.index import Index

    truth = exact_top(corpus, queries, k)
    dim = corpus.shape[1]
    rows = []

    def measure(name: str, build, search) -> None:
        t0 = time.perf_counter()
        index = build()
        build_s = time.perf_counter() - t0
        found, t1 = [], time.perf_counter()
        for q in queries:
            found.append(search(index, q[None, :]))
        per_query_ms = 1000 * (time.perf_counter() - t1) / len(queries)
        recall = np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)])
        rows.append((name, float(recall), per_query_ms, build_s))

    measure("numpy exact (reference)", lambda: corpus, lambda ix, q: exact_top(ix, q, k)[0])

    def faiss_flat():
        ix = faiss.IndexFlatIP(dim)
        ix.add(corpus)
        return ix

    def faiss_hnsw():
        ix = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        ix.hnsw.efSearch = 64
        ix.add(corpus)
        return ix

    def usearch_hnsw():
        ix = Index(ndim=dim, metric="ip", dtype="f32")
        ix.add(np.arange(len(corpus)), corpus)
        return ix

    measure("faiss IndexFlatIP (exact)", faiss_flat, lambda ix, q: ix.search(q, k)[1][0])
    measure("faiss IndexHNSWFlat M=32 ef=64", faiss_hnsw, lambda ix, q: ix.search(q, k)[1][0])
    measure(
        "usearch HNSW (defaults, f32)", usearch_hnsw, lambda ix, q: np.atleast_2d(ix.search(q, k).keys)[0]
    )
    return rows


def print_table(title: str, rows: list[tuple[str, float, float, float]]) -> None:
    print(f"\n{title}")
    print(f"{'back-end':<34}{'recall@10':>10}{'ms/query':>10}{'build s':>9}")
    for name, recall, ms, build in rows:
        print(f"{name:<34}{recall:>10.3f}{ms:>10.3f}{build:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--index", default="runs/rag_eval/real.index", help="index directory to read vectors from"
    )
    parser.add_argument(
        "--scale", type=int, default=20, help="also test N noisy copies of the corpus (0: skip)"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    from llmlab.apps.embeddings import load_embedder
    from llmlab.apps.rag.qaset import load_qa

    corpus = load_vectors(Path(args.index))
    queries = load_embedder().embed([it["question"] for it in load_qa()])
    print_table(f"our eval corpus: {len(corpus)} chunks x {corpus.shape[1]} dims, {len(queries)} queries",
                run_backends(corpus, queries))  # fmt: skip
    if args.scale:
        rng = np.random.default_rng(0)
        big = np.concatenate(
            [corpus + rng.normal(0, 0.02, corpus.shape).astype(np.float32) for _ in range(args.scale)]
        )
        big /= np.linalg.norm(big, axis=1, keepdims=True)
        print_table(f"{args.scale} noisy copies: {len(big)} chunks", run_backends(big, queries))


if __name__ == "__main__":
    main()
