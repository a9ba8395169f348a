"""What a search returns (:class:`Hit`) and how ranked lists are fused (:func:`rrf_fuse`).

Reciprocal-rank fusion (Cormack et al. 2009): ``score(d) = sum_i 1 / (RRF_K + rank_i(d))`` over the ranked
lists that contain ``d`` (ranks from 1, ``RRF_K = 60``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

RRF_K = 60


@dataclass
class Hit:
    """One retrieved passage: chunk ``id``, ``source`` file path (absolute), ``rel`` (path under the indexed
    directory), ``span`` (character span of ``text`` in that file's text), ``score`` (higher is better)."""

    id: int
    source: str
    rel: str
    span: tuple[int, int]
    text: str
    score: float
    chunk_span: tuple[int, int]

    def to_dict(self) -> dict:
        return asdict(self)


def rrf_fuse(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of ranked id lists: ``[(id, sum 1/(k + rank))]`` best first (ties by first seen)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])
