"""Searching a RAG index: BM25, dense, and their reciprocal-rank fusion, returning :class:`Hit` objects.

    idx = open_index("my.index")
    for hit in idx.search("who founded the town?", k=5, mode="hybrid"):
        print(hit.score, hit.source, hit.span, hit.text[:80])

Hybrid is reciprocal-rank fusion of the BM25 and dense lists (:func:`llmlab.apps.rag.hits.rrf_fuse`). With the parent strategy the children are ranked, and
each hit returns its parent's span and text (the first, best-ranked child of a parent stands for it).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmlab.apps.embeddings import Embedder, load_embedder
from llmlab.apps.rag.hits import Hit, rrf_fuse
from llmlab.apps.rag.store import BM25_DIR, BM25_IDS, DB_FILE, VECTOR_FILE, bm25_tokenize, read_meta
from llmlab.apps.rag.vectors import VectorIndex
from llmlab.errors import ConfigError, DataError

MODES = ("bm25", "dense", "hybrid")
CANDIDATES = 50  # depth of each ranked list before fusion


class RagIndex:
    """An opened index (read-only). Use :func:`open_index`."""

    def __init__(self, path: Path, embedder: Embedder | None = None):
        import bm25s  # optional dependency (the rag extra)

        self.path = path
        self.db = sqlite3.connect(f"file:{path / DB_FILE}?mode=ro", uri=True, check_same_thread=False)
        self.meta = read_meta(self.db)
        self.root = Path(self.meta["root"])
        self.num_chunks = int(self.meta.get("chunks", 0))
        if self.num_chunks == 0:
            raise DataError(f"{path}: the index is empty (no text files were indexed)")
        if embedder is not None and embedder.name != self.meta["embedder"]:
            raise ConfigError(
                f"{path} was built with embedder {self.meta['embedder']!r}, not {embedder.name!r}"
            )
        self._embedder = embedder
        self.vectors = VectorIndex.load(
            self.meta["vector_backend"], int(self.meta["dim"]), path / VECTOR_FILE
        )
        self.bm25 = bm25s.BM25.load(str(path / BM25_DIR), show_progress=False)
        self.bm25_ids = np.array(json.loads((path / BM25_DIR / BM25_IDS).read_text()), dtype=np.int64)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder(self.meta["embedder"])
        return self._embedder

    # ------------------------------------------------------------------------------ ranked id lists
    def bm25_ranking(self, query: str, k: int) -> list[tuple[int, float]]:
        tokens = [t for t in bm25_tokenize([query])[0] if t in self.bm25.vocab_dict]
        if not tokens:
            return []
        docs, scores = self.bm25.retrieve([tokens], k=min(k, self.num_chunks), show_progress=False)
        return [(int(self.bm25_ids[d]), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]

    def dense_ranking(self, query: str | np.ndarray, k: int) -> list[tuple[int, float]]:
        vector = self.embedder.embed([query])[0] if isinstance(query, str) else query
        ids, scores = self.vectors.search(vector[None, :], k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def ranking(self, query: str, k: int, mode: str) -> list[tuple[int, float]]:
        """Chunk ids and scores, best first, by ``mode`` (bm25, dense or hybrid RRF)."""
        if mode == "bm25":
            return self.bm25_ranking(query, k)
        if mode == "dense":
            return self.dense_ranking(query, k)
        if mode == "hybrid":
            depth = max(k, CANDIDATES)
            lists = [
                [i for i, _ in self.bm25_ranking(query, depth)],
                [i for i, _ in self.dense_ranking(query, depth)],
            ]
            return rrf_fuse(lists)[:k]
        raise ConfigError(f"search mode {mode!r} is not one of {', '.join(MODES)}")

    # ----------------------------------------------------------------------------------- hits
    def hits(self, ranking: Sequence[tuple[int, float]], k: int) -> list[Hit]:
        """Hits for ranked chunk ids (one per parent with the parent strategy), at most ``k``."""
        out: list[Hit] = []
        seen_parents: set[int] = set()
        for chunk_id, score in ranking:
            row = self.db.execute(
                "SELECT c.path, c.start, c.end, c.text, p.id, p.start, p.end, p.text FROM chunks c "
                "LEFT JOIN parents p ON p.id = c.parent_id WHERE c.id = ?",
                (chunk_id,),
            ).fetchone()
            if row is None:
                continue
            path, start, end, text, pid, pstart, pend, ptext = row
            if pid is not None:
                if pid in seen_parents:
                    continue
                seen_parents.add(pid)
                span, text = (pstart, pend), ptext
            else:
                span = (start, end)
            out.append(Hit(chunk_id, str(self.root / path), path, span, text, float(score), (start, end)))
            if len(out) >= k:
                break
        return out

    def search(
        self,
        query: str,
        k: int = 5,
        mode: str = "hybrid",
        *,
        llm: object | None = None,
        expand: str | None = None,
        rerank: bool = False,
        rerank_depth: int = 20,
    ) -> list[Hit]:
        """The ``k`` best passages for ``query``.

        ``expand`` (needs ``llm``): ``"rewrite"`` (search with an LLM-rewritten query), ``"multi"`` (RRF over
        the question and LLM paraphrases) or ``"hyde"`` (dense search with a hypothetical answer passage,
        fused with the plain query). ``rerank`` (needs ``llm``) reorders the top ``rerank_depth`` by the LLM's
        yes/no log-probability that the passage answers the question.
        """
        if not query.strip():
            raise ConfigError("empty search query")
        depth = max(k, rerank_depth) if rerank else k
        if expand:
            from llmlab.apps.rag.query import expanded_ranking  # needs the engine

            ranking = expanded_ranking(self, query, depth, mode, llm, expand)
        else:
            ranking = self.ranking(query, depth * 3 if self._has_parents() else depth, mode)
        hits = self.hits(ranking, depth)
        if rerank:
            from llmlab.apps.rag.rerank import llm_rerank  # needs the engine

            hits = llm_rerank(llm, query, hits)
        return hits[:k]

    def _has_parents(self) -> bool:
        return self.meta.get("chunking", {}).get("strategy") == "parent"

    def close(self) -> None:
        self.db.close()


def open_index(path: str | Path, embedder: Embedder | None = None) -> RagIndex:
    """Open the index directory ``path`` (DataError naming it if missing, not an index, or empty)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such index (build one with `llmlab rag index DIR --out {path}`)")
    if not (path / DB_FILE).is_file():
        raise DataError(f"{path}: not a RAG index (no {DB_FILE}; build one with `llmlab rag index`)")
    try:
        return RagIndex(path, embedder)
    except sqlite3.DatabaseError as exc:
        raise DataError(f"{path / DB_FILE}: unreadable index database ({exc})") from exc
    except (OSError, ValueError, KeyError) as exc:  # a missing or truncated vectors/BM25 file, bad meta
        raise DataError(f"{path}: damaged index ({exc}); rebuild it with `llmlab rag index`") from exc
