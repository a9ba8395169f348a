"""Chunking: split a document's text into retrievable pieces, each an exact character span of the text.

Three strategies (``ChunkConfig.strategy``); a "token" is a word or a punctuation mark (``\\w+|[^\\w\\s]``),
so sizes mean the same for every model:

- ``fixed``: windows of ``size`` tokens, each starting ``size - overlap`` tokens after the previous one;
- ``sentence``: whole sentences packed up to ``size`` tokens (a longer sentence becomes fixed windows); the next
  chunk starts with the last sentence of the previous one when ``overlap`` > 0;
- ``parent``: sentence-aware parents of ``parent_size`` tokens, each cut into sentence-aware children of
  ``size`` tokens. Retrieval matches the small children and returns their parent ("retrieve small, read big").
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from llmlab.errors import ConfigError

_TOKEN = re.compile(r"\w+|[^\w\s]")
# A sentence ends at . ! ? (plus closing quotes/brackets) followed by whitespace, or at a blank line.
_SENT_END = re.compile(r"(?<=[.!?])[\"'\)\]]*\s+|\n\s*\n")
_ABBREV = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Prof|Jr|Sr|vs|etc|e\.g|i\.e|No|Vol|Mt)\.$")

STRATEGIES = ("fixed", "sentence", "parent")


@dataclass(frozen=True)
class ChunkConfig:
    """How to chunk: strategy, child size and overlap in tokens, parent size (``parent`` strategy only)."""

    strategy: str = "sentence"
    size: int = 96
    overlap: int = 16
    parent_size: int = 384

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"chunk strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.size < 8:
            raise ConfigError(f"chunk size must be at least 8 tokens, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise ConfigError(f"chunk overlap must be in [0, size), got {self.overlap}")
        if self.strategy == "parent" and self.parent_size < self.size:
            raise ConfigError(f"parent_size {self.parent_size} must be >= size {self.size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Span:
    """A chunk: ``text[start:end]``, and for the parent strategy its parent's span."""

    start: int
    end: int
    parent: tuple[int, int] | None = None


def token_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Character spans of the tokens of ``text[start:end]``."""
    return [m.span() for m in _TOKEN.finditer(text, start, len(text) if end is None else end)]


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text[start:end]`` (trimmed, non-empty)."""
    end = len(text) if end is None else end
    spans: list[tuple[int, int]] = []
    pos = start
    for m in _SENT_END.finditer(text, start, end):
        if _ABBREV.search(text, max(pos, m.start() - 6), m.start()):
            continue  # "Mr. Smith": not a sentence end
        spans.append((pos, m.start()))
        pos = m.end()
    spans.append((pos, end))
    out = []
    for a, b in spans:
        piece = text[a:b]
        if piece.strip():
            a += len(piece) - len(piece.lstrip())
            b -= len(piece) - len(piece.rstrip())
            out.append((a, b))
    return out


def _fixed(text: str, start: int, end: int, size: int, overlap: int) -> list[tuple[int, int]]:
    toks = token_spans(text, start, end)
    if not toks:
        return []
    out = []
    step = size - overlap
    for i in range(0, len(toks), step):
        window = toks[i : i + size]
        out.append((window[0][0], window[-1][1]))
        if i + size >= len(toks):
            break
    return out


def _sentence_packed(text: str, start: int, end: int, size: int, overlap: int) -> list[tuple[int, int]]:
    sents = [(a, b, len(token_spans(text, a, b))) for a, b in sentence_spans(text, start, end)]
    out: list[tuple[int, int]] = []
    group: list[tuple[int, int, int]] = []
    for sent in sents:
        a, b, n = sent
        if n > size:  # one over-long sentence: close the group, window the sentence itself
            if group:
                out.append((group[0][0], group[-1][1]))
                group = []
            out.extend(_fixed(text, a, b, size, overlap))
            continue
        if group and sum(g[2] for g in group) + n > size:
            out.append((group[0][0], group[-1][1]))
            carry = group[-1]
            group = [carry] if overlap > 0 and carry[2] + n <= size else []
        group.append(sent)
    if group:
        out.append((group[0][0], group[-1][1]))
    return out


def chunk_text(text: str, config: ChunkConfig) -> list[Span]:
    """The chunks of ``text`` in document order (exact spans, so ``text[s.start:s.end]`` is the chunk)."""
    if config.strategy == "fixed":
        return [Span(a, b) for a, b in _fixed(text, 0, len(text), config.size, config.overlap)]
    if config.strategy == "sentence":
        return [Span(a, b) for a, b in _sentence_packed(text, 0, len(text), config.size, config.overlap)]
    spans = []
    for pa, pb in _sentence_packed(text, 0, len(text), config.parent_size, 0):
        for a, b in _sentence_packed(text, pa, pb, config.size, config.overlap):
            spans.append(Span(a, b, (pa, pb)))
    return spans
