"""The on-disk RAG index: SQLite for files, chunks, text and embeddings; a vector index and a BM25 index beside it.

    INDEX/index.sqlite   meta (embedder, chunking, vector back-end, root), files (path, sha256),
                         parents (id, path, span, text), chunks (id, path, span, parent_id, text, vector)
    INDEX/vectors.index  the dense index over chunk ids (:mod:`llmlab.apps.rag.vectors`)
    INDEX/bm25/          the bm25s index over the same chunks, in ``bm25_ids.json`` order

:func:`build_index` is incremental: a file whose sha256 is unchanged keeps its chunks and embeddings (nothing is
re-embedded); changed files are re-chunked and re-embedded, removed files dropped. The embeddings stay in SQLite,
so the vector and BM25 indexes are rebuilt from them each time (seconds) and can never drift from the chunks.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmlab.apps.embeddings import Embedder
from llmlab.apps.rag.chunking import ChunkConfig, Span, chunk_text
from llmlab.apps.rag.ingest import IngestReport, ingest_dir
from llmlab.apps.rag.vectors import DEFAULT_BACKEND, VectorIndex
from llmlab.errors import DataError

DB_FILE = "index.sqlite"
VECTOR_FILE = "vectors.index"
BM25_DIR = "bm25"
BM25_IDS = "bm25_ids.json"
FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, n_chars INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS parents (id INTEGER PRIMARY KEY, path TEXT NOT NULL, start INTEGER NOT NULL,
    end INTEGER NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, path TEXT NOT NULL, start INTEGER NOT NULL,
    end INTEGER NOT NULL, parent_id INTEGER, text TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_path ON chunks (path);
CREATE INDEX IF NOT EXISTS parents_path ON parents (path);
"""


@dataclass
class IndexStats:
    """What one ``build_index`` call did."""

    added: int = 0  # new or changed files (re-chunked and embedded)
    unchanged: int = 0  # skipped by content hash
    removed: int = 0  # gone from the directory
    chunks: int = 0  # chunks in the index afterwards
    embedded: int = 0  # chunks embedded by this call
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (binary, unreadable, ...)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def bm25_tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased words of 2+ characters without English stop words (bm25s' own tokenizer)."""
    import bm25s  # optional dependency (the rag extra)

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def connect(index_dir: Path) -> sqlite3.Connection:
    db = sqlite3.connect(index_dir / DB_FILE)
    db.executescript(_SCHEMA)
    return db


def read_meta(db: sqlite3.Connection) -> dict:
    return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}


def _write_meta(db: sqlite3.Connection, meta: dict) -> None:
    db.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        [(k, json.dumps(v)) for k, v in meta.items()],
    )


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory (the index is a directory)")
    if out.is_dir() and any(out.iterdir()) and not (out / DB_FILE).is_file():
        raise DataError(f"{out}: not empty and not a RAG index; refusing to write into it")


def _add_file(db: sqlite3.Connection, path: str, text: str, spans: list[Span], vectors: np.ndarray) -> None:
    parent_ids: dict[tuple[int, int], int] = {}
    for s in spans:
        if s.parent is not None and s.parent not in parent_ids:
            cur = db.execute(
                "INSERT INTO parents (path, start, end, text) VALUES (?, ?, ?, ?)",
                (path, s.parent[0], s.parent[1], text[s.parent[0] : s.parent[1]]),
            )
            parent_ids[s.parent] = int(cur.lastrowid)
    db.executemany(
        "INSERT INTO chunks (path, start, end, parent_id, text, vector) VALUES (?, ?, ?, ?, ?, ?)",
        [
            (
                path,
                s.start,
                s.end,
                parent_ids.get(s.parent) if s.parent else None,
                text[s.start : s.end],
                v.tobytes(),
            )
            for s, v in zip(spans, vectors)
        ],
    )


def _remove_file(db: sqlite3.Connection, path: str) -> None:
    db.execute("DELETE FROM chunks WHERE path = ?", (path,))
    db.execute("DELETE FROM parents WHERE path = ?", (path,))
    db.execute("DELETE FROM files WHERE path = ?", (path,))


def build_index(
    root: str | Path,
    out: str | Path,
    embedder: Embedder,
    config: ChunkConfig | None = None,
    backend: str = DEFAULT_BACKEND,
    report: IngestReport | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> IndexStats:
    """Index (or incrementally re-index) the documents under ``root`` into the directory ``out``.

    A change of embedder, chunking or vector back-end re-indexes everything. ``report`` may pass a ready
    :func:`~llmlab.apps.rag.ingest.ingest_dir` result. New chunks are embedded in batches of ``batch_size``
    in one pass, with a progress bar (``progress``) when there are more than 64.
    """
    t0 = time.perf_counter()
    config = config or ChunkConfig()
    out = Path(out)
    _check_out_dir(out)
    report = report if report is not None else ingest_dir(root)
    out.mkdir(parents=True, exist_ok=True)
    stats = IndexStats(skipped=dict(report.skipped))
    meta = {
        "format": FORMAT_VERSION,
        "embedder": embedder.name,
        "dim": embedder.dim,
        "chunking": config.to_dict(),
        "vector_backend": backend,
        "root": str(Path(root).resolve()),
    }
    db = connect(out)
    try:
        old = read_meta(db)
        if {k: old.get(k) for k in ("format", "embedder", "dim", "chunking", "vector_backend")} != {
            k: meta[k] for k in ("format", "embedder", "dim", "chunking", "vector_backend")
        }:
            db.executescript("DELETE FROM chunks; DELETE FROM parents; DELETE FROM files;")
        known = dict(db.execute("SELECT path, sha256 FROM files"))
        current = {f.path for f in report.files}
        for path in sorted(set(known) - current):
            _remove_file(db, path)
            stats.removed += 1
        changed = []
        for f in report.files:
            if known.get(f.path) == f.sha256:
                stats.unchanged += 1
            else:
                changed.append((f, chunk_text(f.text, config)))
        # One batched embedding pass over every new chunk (with a progress bar when there is real work).
        texts = [f.text[s.start : s.end] for f, spans in changed for s in spans]
        vectors = embedder.embed(texts, batch_size=batch_size, progress=progress and len(texts) > 64)
        offset = 0
        for f, spans in changed:
            _remove_file(db, f.path)
            _add_file(db, f.path, f.text, spans, vectors[offset : offset + len(spans)])
            offset += len(spans)
            db.execute(
                "INSERT INTO files (path, sha256, n_chars) VALUES (?, ?, ?)", (f.path, f.sha256, len(f.text))
            )
        stats.added, stats.embedded = len(changed), len(texts)
        _write_meta(db, meta)
        db.commit()
        stats.chunks = _rebuild_search_indexes(db, out, backend, embedder.dim)
        _write_meta(db, {"chunks": stats.chunks, "files": len(current)})
        db.commit()
    finally:
        db.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def _rebuild_search_indexes(db: sqlite3.Connection, out: Path, backend: str, dim: int) -> int:
    import bm25s  # optional dependency (the rag extra)

    rows = db.execute("SELECT id, text, vector FROM chunks ORDER BY id").fetchall()
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
    index = VectorIndex(backend, dim)
    index.add(ids, vectors)
    index.save(out / VECTOR_FILE)
    bm25_dir = out / BM25_DIR
    bm25_dir.mkdir(exist_ok=True)
    if rows:
        retriever = bm25s.BM25()
        retriever.index(bm25_tokenize([r[1] for r in rows]), show_progress=False)
        retriever.save(str(bm25_dir), show_progress=False)
    (bm25_dir / BM25_IDS).write_text(json.dumps(ids.tolist()))
    return len(rows)
