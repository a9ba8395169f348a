"""Ingest: find the text, markdown and HTML files under a directory, safely, and read them as plain text.

- Only paths inside the root are read: a symlink whose target resolves outside the root is refused (counted
  under ``escaping_symlink`` and never opened); symlinked directories are not followed.
- Files that are not UTF-8 text (a NUL byte in the first 8 KiB, or undecodable) count as ``binary``; files the
  OS refuses to read count as ``unreadable``; other extensions count as ``unsupported``.
- HTML is reduced to its visible text (no script/style); character spans of its chunks refer to that text.
- Each file carries the sha256 of its bytes, so re-indexing skips files whose content did not change.
"""

from __future__ import annotations

import hashlib
import html.parser
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.errors import DataError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
SNIFF_BYTES = 8192


@dataclass(frozen=True)
class SourceFile:
    """One ingested file: ``path`` relative to the root (POSIX separators), its plain text and content hash."""

    path: str
    text: str
    sha256: str


@dataclass
class IngestReport:
    """Files found, and how many were skipped for each reason (with their relative paths)."""

    files: list[SourceFile] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_paths: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, path: str) -> None:
        self.skipped[reason] += 1
        self.skipped_paths.setdefault(reason, []).append(path)


class _VisibleText(html.parser.HTMLParser):
    """The visible text of an HTML page: script/style dropped, a line break at each block element."""

    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre"}
    HIDDEN = {"script", "style", "head", "template", "noscript"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.HIDDEN:
            self.hidden_depth += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden_depth = max(0, self.hidden_depth - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden_depth:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Visible text of ``markup`` with runs of blank lines and spaces collapsed."""
    parser = _VisibleText()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def read_source(full: Path, rel: str) -> tuple[SourceFile | None, str | None]:
    """``(SourceFile, None)``, or ``(None, reason)`` when the file is binary/unreadable/empty."""
    try:
        data = full.read_bytes()
    except OSError:
        return None, "unreadable"
    if b"\x00" in data[:SNIFF_BYTES]:
        return None, "binary"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "binary"
    if full.suffix.lower() in HTML_SUFFIXES:
        text = html_to_text(text)
    text = text.replace("\r\n", "\n")
    if not text.strip():
        return None, "empty"
    return SourceFile(rel, text, hashlib.sha256(data).hexdigest()), None


def ingest_dir(root: str | Path) -> IngestReport:
    """Every supported file under ``root`` (sorted by path); raises DataError if ``root`` is not a directory."""
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"{root}: not a directory (give the folder of documents to index)")
    root_real = root_path.resolve()
    report = IngestReport()
    for dirpath, dirnames, filenames in os.walk(root_path, followlinks=False):
        here = Path(dirpath)
        for d in list(dirnames):
            if (here / d).is_symlink():
                dirnames.remove(d)  # not followed: a linked tree may escape the root or loop
                report.skip("symlinked_dir", (here / d).relative_to(root_path).as_posix())
        dirnames.sort()
        for name in sorted(filenames):
            full = here / name
            rel = full.relative_to(root_path).as_posix()
            if full.is_symlink() and not _inside(full.resolve(), root_real):
                report.skip("escaping_symlink", rel)
                continue
            suffix = full.suffix.lower()
            if suffix not in TEXT_SUFFIXES | HTML_SUFFIXES:
                report.skip("unsupported", rel)
                continue
            source, reason = read_source(full, rel)
            if source is None:
                report.skip(reason or "unreadable", rel)
            else:
                report.files.append(source)
    report.files.sort(key=lambda f: f.path)
    return report


def resolve_inside(root: str | Path, rel: str) -> Path:
    """``root/rel``, refusing any path that leaves ``root`` (``..``, absolute paths, escaping symlinks)."""
    root_real = Path(root).resolve()
    target = (root_real / rel).resolve()
    if not _inside(target, root_real):
        raise DataError(f"{rel}: path is outside {root}")
    return target
