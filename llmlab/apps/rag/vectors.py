"""The dense vector index persisted beside the chunk store: inner product over L2-normalized embeddings.

Two back-ends, chosen by measurement (``bench/rag_vector_index.py``; BENCHMARKS.md, 2026-12-04):

- ``faiss-flat`` (default): ``faiss.IndexIDMap2(IndexFlatIP)``, exact, so recall is 1 by definition. On our eval
  corpus (1,189 chunks) a query takes 0.03 ms; on 20 noisy copies (23,780 chunks) 4.4 ms, still far below the
  ~20 ms of embedding the query, so approximate search buys nothing at this scale.
- ``usearch``: usearch's HNSW graph (approximate): at 23,780 chunks recall@10 0.985 at 0.15 ms/query, against
  0.910 for faiss' IndexHNSWFlat (M=32, efSearch=64); the option for corpora where exact search becomes the
  bottleneck.

Both map a chunk id (int64) to its vector and return ``(ids, scores)`` best first; ids of -1 are never returned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmlab.errors import ConfigError, DataError

BACKENDS = ("faiss-flat", "usearch")
DEFAULT_BACKEND = "faiss-flat"


class VectorIndex:
    """Build/search/save/load a vector index over ``(ids, vectors)``."""

    def __init__(self, backend: str, dim: int):
        if backend not in BACKENDS:
            raise ConfigError(f"vector index {backend!r} is not one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.dim = dim
        self._index = self._empty()

    def _empty(self) -> object:
        if self.backend == "faiss-flat":
            import faiss  # optional dependency (the rag extra)

            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        from usearch.index import Index  # optional dependency (the rag extra)

        return Index(ndim=self.dim, metric="ip", dtype="f32")

    def __len__(self) -> int:
        return int(self._index.ntotal) if self.backend == "faiss-flat" else len(self._index)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(ids) == 0:
            return
        if self.backend == "faiss-flat":
            self._index.add_with_ids(vectors, ids)
        else:
            self._index.add(ids.astype(np.uint64), vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, scores)`` of shape ``(n_queries, <=k)``; missing results are id -1."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        n = len(self)
        if n == 0 or k <= 0:
            return np.full((len(queries), 0), -1, np.int64), np.zeros((len(queries), 0), np.float32)
        k = min(k, n)
        if self.backend == "faiss-flat":
            scores, ids = self._index.search(queries, k)
            return ids, scores
        matches = self._index.search(queries, k)
        keys = np.atleast_2d(matches.keys).astype(np.int64)
        scores = 1.0 - np.atleast_2d(matches.distances).astype(np.float32)  # usearch "ip" distance = 1 - dot
        counts = np.atleast_1d(getattr(matches, "counts", keys.shape[1]))  # one query: Matches, no counts
        for row, count in enumerate(counts):
            keys[row, count:] = -1
        return keys, scores

    def save(self, path: Path) -> None:
        if self.backend == "faiss-flat":
            import faiss

            faiss.write_index(self._index, str(path))
        else:
            self._index.save(str(path))

    @classmethod
    def load(cls, backend: str, dim: int, path: Path) -> VectorIndex:
        index = cls(backend, dim)
        if not path.is_file():
            raise DataError(f"{path}: vector index file is missing (re-run `llmlab rag index`)")
        if backend == "faiss-flat":
            import faiss

            index._index = faiss.read_index(str(path))
        else:
            index._index.load(str(path))
        return index
