"""Bundled pretraining corpora, and reading a user's own ``.txt`` / ``.jsonl`` corpus.

A corpus is a list of *documents*: the unit that cleaning filters, deduplication compares, and the train/val
split assigns as a whole (so no document leaks across the split). What a document is depends on the corpus:

==================  ================================================================================
``gutenberg``       14 public-domain book files (NLTK's Gutenberg selection). Each is cut at paragraph
                    breaks into blocks of about ``chunk_chars`` characters; a chapter/book/act heading
                    starts a new block. ``source`` is the book file, for book-level splits.
``tinyshakespeare`` Consecutive speeches (blank-line separated) grouped into blocks of ~``chunk_chars``.
``tinystories``     One story. Upstream lost the story separators, so a story starts at a paragraph that
                    opens like a story ("Once upon a time", "Once there was", ...); other paragraphs join
                    the story before them. ~785 stories are found this way; the rest of the ~1,000 (runs
                    of stories with other openings) fall into paragraph blocks of ~``chunk_chars``.
``wikitext2-*``     One Wikipedia article: from a `` = Title = `` line to the next one (the text is the
                    tokenized WikiText-2 release, kept byte for byte for comparable perplexities).
user ``.txt``       Paragraph blocks of ~``chunk_chars`` (like Gutenberg); ``source`` is the file.
user ``.jsonl``     One document per record ``{"text": ...}``.
==================  ================================================================================

Every bundled document is an exact slice of its source text: joining a book's or file's documents gives
back the text (only WikiText's blank preamble before the first title is dropped).

Bundled files live in ``llmlab/assets/corpora`` (see its ``SOURCES.md`` for origin and licence), so nothing
here needs the network or an external data directory.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmlab.errors import ConfigError, DataError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "corpora"
DEFAULT_CHUNK_CHARS = 4000


@dataclass(frozen=True)
class Document:
    """One document and the group it came from (book, file, corpus) for source-level splits."""

    text: str
    source: str


@dataclass(frozen=True)
class CorpusInfo:
    name: str
    file: str
    description: str
    licence: str


CORPORA: dict[str, CorpusInfo] = {
    info.name: info
    for info in [
        CorpusInfo(
            "gutenberg",
            "nltk_gutenberg.zip",
            "NLTK's Project Gutenberg selection: 14 book files, 10.4 MB (Austen, Bible, Melville, Shakespeare, ...)",
            "public domain",
        ),
        CorpusInfo(
            "tinyshakespeare",
            "tinyshakespeare.txt.gz",
            "Karpathy's tiny-shakespeare, 1.1 MB",
            "public domain",
        ),
        CorpusInfo(
            "tinystories",
            "tinystories_valid_head.txt.gz",
            "head of TinyStories-valid, ~1,000 short stories, 0.8 MB",
            "CDLA-Sharing-1.0",
        ),
        CorpusInfo(
            "wikitext2-valid",
            "wikitext2_valid.txt.gz",
            "WikiText-2 validation split (tokenized release), 1.1 MB",
            "CC BY-SA 3.0",
        ),
        CorpusInfo(
            "wikitext2-test",
            "wikitext2_test.txt.gz",
            "WikiText-2 test split (tokenized release), 1.3 MB: the held-out perplexity set",
            "CC BY-SA 3.0",
        ),
    ]
}
ALIASES = {
    "shakespeare": "tinyshakespeare",
    "tiny-shakespeare": "tinyshakespeare",
    "tiny_shakespeare": "tinyshakespeare",
}
USER_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")

# A blank line (possibly holding spaces) separates paragraphs.
_PARA_BREAK = re.compile(r"\n[ \t\r]*\n\s*")
# Headings that should open a new Gutenberg block: "CHAPTER I", "Chapter 1", "Book I", "Actus Primus", "ACT II".
_HEADING = re.compile(r"(?:CHAPTER|Chapter|BOOK|Book|ACT|Act|Actus|VOLUME|PART)\b[ .]*[\w]+")
# Paragraph openings that start a new TinyStories story.
_STORY_START = re.compile(
    r"(?:Once upon a time|Once there (?:was|were|lived|is)|There once (?:was|were|lived))"
)
# A WikiText article title line: " = Title = " (sections are " = = Title = = ").
_WIKI_TITLE = re.compile(r"^ = [^=\n].* = \n", re.MULTILINE)


# ------------------------------------------------------------------------------------------- lookup
def list_corpora() -> list[str]:
    """Names of the bundled corpora."""
    return list(CORPORA)


def _canonical(name: str) -> str | None:
    name = ALIASES.get(name, name)
    return name if name in CORPORA else None


def corpus_path(name: str) -> Path:
    """Path of a bundled corpus file, or of a user's file/dir (which must exist)."""
    canonical = _canonical(name)
    if canonical is not None:
        path = ASSETS / CORPORA[canonical].file
        if not path.is_file():
            raise DataError(f"{path}: bundled corpus file is missing (broken install?)")
        return path
    path = Path(name).expanduser()
    if path.exists():
        return path
    raise DataError(
        f"unknown corpus '{name}': not a bundled corpus ({', '.join(list_corpora())}) "
        "and no such file or directory"
    )


# ------------------------------------------------------------------------------------------ decoding
def decode_utf8(data: bytes, path: str | Path) -> str:
    """Strict UTF-8 decode; on failure name the file, line and byte offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start : exc.start + 1].hex()
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{bad} at offset {exc.start})") from exc


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def _gutenberg_books() -> Iterator[tuple[str, str]]:
    """(member name, text) for each book of the bundled zip."""
    path = corpus_path("gutenberg")
    with zipfile.ZipFile(path) as zf:
        for member in sorted(zf.namelist()):
            if not member.endswith(".txt"):
                continue  # the directory entry and NLTK's README
            data = zf.read(member)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("latin-1")  # shakespeare-caesar.txt is Latin-1 ("C\xe6sar")
            yield member, text.replace("\r\n", "\n")


# ----------------------------------------------------------------------------------------- chunking
def paragraph_blocks(
    text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS, break_on_headings: bool = False
) -> list[str]:
    """Cut ``text`` at paragraph breaks into blocks of about ``chunk_chars`` characters.

    A block closes at the first paragraph break after it reaches ``chunk_chars``; a block that still grows
    past twice that (verse or prose without blank lines) closes at the next line break instead. With
    ``break_on_headings`` a chapter-like heading starts a new block once the current one holds a quarter of
    ``chunk_chars``. The blocks are exact slices, ``"".join(blocks) == text``, and none is only whitespace
    (a blank ``text`` gives no blocks).
    """
    if chunk_chars < 1:
        raise ConfigError(f"chunk_chars must be positive, got {chunk_chars}")
    blocks: list[str] = []
    start = 0
    pos = 0
    while pos < len(text):
        para = _PARA_BREAK.search(text, pos)
        cut = para.end() if para else len(text)
        if cut - start > 2 * chunk_chars:
            # No paragraph break in reach: fall back to the first line break past chunk_chars.
            line = text.find("\n", start + chunk_chars, cut)
            if line != -1 and line + 1 < cut:
                blocks.append(text[start : line + 1])
                start = pos = line + 1
                continue
        if cut >= len(text):
            break
        heading = (
            break_on_headings and cut - start >= chunk_chars // 4 and _HEADING.match(text, cut) is not None
        )
        if cut - start >= chunk_chars or heading:
            blocks.append(text[start:cut])
            start = cut
        pos = cut
    if start < len(text):
        if blocks and len(text) - start < chunk_chars // 4:
            blocks[-1] += text[start:]  # a short tail ("THE END") joins the block before it
        else:
            blocks.append(text[start:])
    # Whitespace-only pieces join a neighbour, so the blocks still concatenate to exactly ``text``.
    merged: list[str] = []
    pending = ""
    for b in blocks:
        if not b.strip():
            if merged:
                merged[-1] += b
            else:
                pending += b
        else:
            merged.append(pending + b)
            pending = ""
    return merged


def _stories(text: str, chunk_chars: int) -> list[str]:
    """TinyStories: a new story at each paragraph that opens like a story (exact slices of ``text``).

    Runs of stories with no recognisable opening are cut into paragraph blocks of ~``chunk_chars``.
    """
    starts = [0]
    for m in _PARA_BREAK.finditer(text):
        if _STORY_START.match(text, m.end()):
            starts.append(m.end())
    bounds = [*starts, len(text)]
    return [block for a, b in zip(bounds, bounds[1:]) for block in paragraph_blocks(text[a:b], chunk_chars)]


def _wiki_articles(text: str) -> list[str]:
    """WikiText: one article per `` = Title = `` line; the blank preamble before the first is dropped."""
    starts = [m.start() for m in _WIKI_TITLE.finditer(text)]
    if not starts:
        return [text] if text.strip() else []
    bounds = [*starts, len(text)]
    docs = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    if text[: starts[0]].strip():
        docs.insert(0, text[: starts[0]])
    return docs


# ------------------------------------------------------------------------------------------ loading
def read_text(name: str) -> str:
    """The whole raw text of a bundled corpus or user file (for compression baselines, perplexity evals)."""
    canonical = _canonical(name)
    if canonical == "gutenberg":
        return "".join(text for _, text in _gutenberg_books())
    if canonical is not None:
        path = corpus_path(canonical)
        return decode_utf8(_read_bytes(path), path)
    return "".join(doc.text for doc in load_documents(name))


def load_documents(name: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[Document]:
    """Documents of a bundled corpus (by name) or of a user's ``.txt``/``.jsonl`` file or directory.

    Raises :class:`DataError` for an unknown name, undecodable or malformed input, or an empty corpus.
    """
    canonical = _canonical(name)
    if canonical == "gutenberg":
        docs = [
            Document(block, member)
            for member, text in _gutenberg_books()
            for block in paragraph_blocks(text, chunk_chars, break_on_headings=True)
        ]
    elif canonical is not None:
        text = read_text(canonical)
        if canonical == "tinyshakespeare":
            pieces = paragraph_blocks(text, chunk_chars)
        elif canonical == "tinystories":
            pieces = _stories(text, chunk_chars)
        else:
            pieces = _wiki_articles(text)
        docs = [Document(p, canonical) for p in pieces]
    else:
        docs = _load_user(corpus_path(name), chunk_chars)
    if not docs:
        raise DataError(f"{name}: corpus is empty (no non-blank documents)")
    return docs


def load_corpus(name: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Document texts of a corpus; see :func:`load_documents`."""
    return [doc.text for doc in load_documents(name, chunk_chars)]


def _user_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(USER_SUFFIXES))
        if not files:
            raise DataError(f"{path}: no {'/'.join(USER_SUFFIXES)} files in this directory")
        return files
    if not path.name.endswith(USER_SUFFIXES):
        raise DataError(f"{path}: unsupported corpus file type (use {', '.join(USER_SUFFIXES)})")
    return [path]


def _load_user(path: Path, chunk_chars: int) -> list[Document]:
    docs: list[Document] = []
    for file in _user_files(path):
        text = decode_utf8(_read_bytes(file), file)
        source = str(file)
        if file.name.endswith((".jsonl", ".jsonl.gz")):
            docs.extend(Document(t, source) for t in _jsonl_texts(text, file))
        else:
            docs.extend(Document(b, source) for b in paragraph_blocks(text, chunk_chars) if b.strip())
    return docs


def _jsonl_texts(text: str, file: Path) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{file}:{lineno}: expected a JSON object with a string "text" field')
        if record["text"].strip():
            yield record["text"]


# -------------------------------------------------------------------------------------------- split
def split_documents(
    docs: list[Document], val_fraction: float = 0.1, seed: int = 0, by: str = "document"
) -> tuple[list[int], list[int]]:
    """Deterministic train/val split of ``docs``; returns (train indices, val indices), each in corpus order.

    ``by="document"`` holds out ``round(val_fraction * n)`` random documents (at least one, and at least one
    left for training). ``by="source"`` holds out whole sources (books, files) until about ``val_fraction``
    of the characters are held out, so no book contributes to both splits.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = random.Random(seed)
    if by == "document":
        if len(docs) < 2:
            raise DataError(f"cannot split {len(docs)} document(s) into train and val; need at least 2")
        order = list(range(len(docs)))
        rng.shuffle(order)
        n_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
        val = set(order[:n_val])
    elif by == "source":
        sources = sorted({d.source for d in docs})
        if len(sources) < 2:
            raise DataError(
                f"cannot split by source: the corpus has {len(sources)} source(s); use by=document"
            )
        rng.shuffle(sources)
        size = {s: 0 for s in sources}
        for d in docs:
            size[d.source] += len(d.text)
        target = val_fraction * sum(size.values())
        held: set[str] = set()
        total = 0
        for s in sources[:-1]:  # always leave one source for training
            if total >= target:
                break
            # Take the source if that brings the held-out size closer to the target (or nothing is held yet).
            if not held or abs(total + size[s] - target) <= abs(total - target):
                held.add(s)
                total += size[s]
        val = {i for i, d in enumerate(docs) if d.source in held}
    else:
        raise ConfigError(f"split by must be 'document' or 'source', got {by!r}")
    train_idx = [i for i in range(len(docs)) if i not in val]
    return train_idx, sorted(val)
