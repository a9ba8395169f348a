"""Per-sentence support check: flag answer sentences that no retrieved source backs.

For an answer sentence ``s`` (citation markers removed) and the sentences ``t`` of the sources:

    similarity(s, source) = max_{t in source} cos(embed(s), embed(t))
    overlap(s, source)    = |content_words(s) & content_words(source)| / |content_words(s)|
    numbers_ok(s, source) = every number written in s appears in the source
    supported(s)  = some source has similarity >= sim_threshold and overlap >= overlap_threshold and numbers_ok

(similarity is the best over that source's sentences, overlap is against the whole source).

Content words are lower-cased ``\\w+`` tokens minus a short stop list. Sentences with fewer than
``MIN_CONTENT_WORDS`` content words ("I don't know.") are not judged. The two thresholds are calibrated on the
eval sets (:func:`calibrate`, ``llmlab rag eval --calibrate``) and shipped in
``llmlab/assets/rag/support_thresholds.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmlab.apps.embeddings import Embedder
from llmlab.apps.rag.chunking import sentence_spans

THRESHOLDS_FILE = Path(__file__).resolve().parents[2] / "assets" / "rag" / "support_thresholds.json"
MIN_CONTENT_WORDS = 2
_CITATION = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")
_WORD = re.compile(r"\w+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
STOP_WORDS = frozenset(
    "a an the and or but of to in on at by for with from as is are was were be been being it its this that these "
    "those he she they them his her their we you i not no yes do does did has have had which who whom whose "
    "what when where why how so than then there also into about over after before under".split()
)


@dataclass(frozen=True)
class SupportThresholds:
    similarity: float = 0.5
    overlap: float = 0.5

    @classmethod
    def load(cls, path: Path = THRESHOLDS_FILE) -> SupportThresholds:
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(float(data["similarity"]), float(data["overlap"]))


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS}


def strip_citations(text: str) -> str:
    return _CITATION.sub("", text).strip()


def answer_sentences(answer: str) -> list[str]:
    """The answer's sentences with citation markers removed (empty ones dropped)."""
    out = [strip_citations(answer[a:b]) for a, b in sentence_spans(answer)]
    return [s for s in out if s]


def support_features(
    sentences: Sequence[str], sources: Sequence[str], embedder: Embedder
) -> list[list[tuple[float, float, bool]]]:
    """``features[i][j] = (similarity, overlap, numbers_ok)`` of sentence ``i`` against source ``j`` (see the
    module docstring); everything is embedded in one batch."""
    if not sentences or not sources:
        return [[] for _ in sentences]
    source_sents = [[src[a:b] for a, b in sentence_spans(src)] or [src] for src in sources]
    flat = [t for sents in source_sents for t in sents]
    vectors = embedder.embed([*sentences, *flat])
    sims = vectors[: len(sentences)] @ vectors[len(sentences) :].T
    bounds = np.cumsum([0, *(len(x) for x in source_sents)])
    source_words = [content_words(src) for src in sources]
    source_numbers = [set(_NUMBER.findall(src)) for src in sources]
    out = []
    for i, sent in enumerate(sentences):
        words = content_words(sent)
        numbers = _NUMBER.findall(sent)
        row = []
        for j in range(len(sources)):
            overlap = len(words & source_words[j]) / len(words) if words else 1.0
            similarity = float(np.max(sims[i, bounds[j] : bounds[j + 1]]))
            row.append((similarity, float(overlap), all(n in source_numbers[j] for n in numbers)))
        out.append(row)
    return out


def is_supported(features: tuple[float, float, bool], thresholds: SupportThresholds) -> bool:
    similarity, overlap, numbers_ok = features
    return similarity >= thresholds.similarity and overlap >= thresholds.overlap and numbers_ok


def judged_sentences(answer: str) -> list[str]:
    """The answer sentences the check judges (those with at least ``MIN_CONTENT_WORDS`` content words)."""
    return [s for s in answer_sentences(answer) if len(content_words(s)) >= MIN_CONTENT_WORDS]


def unsupported_sentences(
    answer: str, sources: Sequence[str], embedder: Embedder, thresholds: SupportThresholds | None = None
) -> list[str]:
    """The sentences of ``answer`` that no single source supports (short ones are not judged)."""
    thresholds = thresholds or SupportThresholds.load()
    sentences = judged_sentences(answer)
    feats = support_features(sentences, sources, embedder)
    return [s for s, row in zip(sentences, feats) if not any(is_supported(f, thresholds) for f in row)]


def calibrate(
    features: Sequence[Sequence[tuple[float, float, bool]]], labels: Sequence[bool]
) -> tuple[SupportThresholds, float]:
    """Thresholds maximizing balanced accuracy ``(TPR + TNR) / 2`` on labelled examples, by grid search.

    ``features[i]`` is one sentence's row of :func:`support_features` (one entry per source); ``labels[i]``
    says whether the sentence is truly supported. Returns the thresholds and their balanced accuracy.
    """
    labels_arr = np.array(labels, dtype=bool)
    best = (SupportThresholds(), -1.0)
    for sim in np.round(np.arange(0.0, 0.96, 0.025), 3):
        for ov in np.round(np.arange(0.0, 1.01, 0.05), 3):
            t = SupportThresholds(float(sim), float(ov))
            pred = np.array([any(is_supported(f, t) for f in row) for row in features], dtype=bool)
            tpr = (pred & labels_arr).sum() / max(1, labels_arr.sum())
            tnr = (~pred & ~labels_arr).sum() / max(1, (~labels_arr).sum())
            score = float((tpr + tnr) / 2)
            if score > best[1] + 1e-9:
                best = (t, score)
    return best
