"""Retrieval-augmented generation over ``llmlab.LLM``: ``llmlab rag index|ask|eval``.

    from llmlab.apps.rag import build_index, open_index, answer_question
    build_index("docs/", "docs.index", load_embedder())
    idx = open_index("docs.index")
    hits = idx.search("question", k=5, mode="hybrid")       # Hit: id, source, rel, span, text, score
    result = answer_question(llm, idx, "question")          # answer, citations, unsupported

Modules: :mod:`.ingest` (safe directory walk), :mod:`.chunking`, :mod:`.store` (SQLite + vectors + BM25,
incremental), :mod:`.vectors`, :mod:`.hits` (Hit, RRF), :mod:`.search` (BM25/dense/hybrid), :mod:`.rerank`
and :mod:`.query` (LLM reranking and query expansion), :mod:`.answer` (prompt, citations), :mod:`.support`
(unsupported-sentence check), :mod:`.evaluate` with :mod:`.synthetic` and :mod:`.qaset` (``llmlab rag eval``).
"""

from __future__ import annotations

from llmlab.apps.embeddings import load_embedder
from llmlab.apps.rag.chunking import ChunkConfig
from llmlab.apps.rag.hits import Hit
from llmlab.apps.rag.search import MODES, RagIndex, open_index
from llmlab.apps.rag.store import IndexStats, build_index

__all__ = [
    "MODES",
    "ChunkConfig",
    "Hit",
    "IndexStats",
    "RagIndex",
    "build_index",
    "load_embedder",
    "open_index",
]
