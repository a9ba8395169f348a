"""``rag_search``'s backend: an index built by ``llmlab rag index`` (:mod:`llmlab.apps.rag`), opened once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmlab.apps.rag import open_index


class IndexRetriever:
    """:class:`~llmlab.apps.agent.tools.Retriever` over a RAG index (a missing or empty index: DataError)."""

    def __init__(self, path: str | Path, mode: str = "hybrid"):
        self.index = open_index(path)
        self.mode = mode

    def search(self, query: str, k: int) -> list[dict[str, Any]]:
        hits = self.index.search(query, k=k, mode=self.mode)
        return [{"id": h.id, "source": h.rel, "text": h.text} for h in hits]
