"""Turn a corpus into token shards: load, clean, split by document, tokenize, write atomically.

``prepare_dataset`` writes the directory format that :mod:`llmlab.data.loader` reads::

    meta.json              dtype, vocab size, special ids, the split and cleaning settings, per-split counts
    train.bin, val.bin     flat token ids; every document is followed by the eos id
    val.txt                the val documents' text, each followed by "\\n" (the byte the eos stands for)
    cleaning_report.json   what each cleaning stage removed (absent with ``clean=False``)
    tokenizer/             the tokenizer used, so the directory is self-describing

Per split, ``meta["splits"][split]["bytes"]`` counts the UTF-8 bytes of the documents plus one per document
for the separator, which is exactly ``len(val.txt)`` for the val split: a model's bits per byte on
``val.bin`` and ``gzip -9`` / ``xz -9e`` on ``val.txt`` (see :func:`compression_baselines`, stored in
``meta["compression"]``) measure the same text.

Pretraining text is untrusted: documents are encoded with ``split_special_tokens=True``, so a document that
contains the string ``<|eos|>`` cannot end itself early or forge a chat marker.
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.data.clean import CleanConfig, CleaningReport, clean_documents
from llmlab.data.corpora import DEFAULT_CHUNK_CHARS, Document, load_documents, split_documents
from llmlab.data.loader import META_FILE, token_dtype
from llmlab.errors import ConfigError, DataError
from llmlab.tokenizer import Tokenizer

FORMAT_VERSION = 1
VAL_TEXT_FILE = "val.txt"
REPORT_FILE = "cleaning_report.json"
TOKENIZER_DIR = "tokenizer"


def compression_baselines(text_bytes: bytes) -> dict[str, float]:
    """Bits per byte of ``gzip -9`` and ``xz -9e`` on ``text_bytes``: the bar a language model should beat."""
    if not text_bytes:
        raise DataError("compression_baselines: empty text")
    n = len(text_bytes)
    gz = gzip.compress(text_bytes, compresslevel=9, mtime=0)
    xz = lzma.compress(text_bytes, preset=9 | lzma.PRESET_EXTREME)
    return {"gzip-9": 8.0 * len(gz) / n, "xz-9": 8.0 * len(xz) / n}


def bits_per_byte(mean_nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """Convert a mean cross-entropy (nats/token) over ``n_tokens`` into bits per byte of ``n_bytes`` text."""
    return mean_nats_per_token * n_tokens / (n_bytes * math.log(2))


def _as_documents(
    corpus: str | Path | Sequence[str] | Sequence[Document], chunk_chars: int
) -> list[Document]:
    if isinstance(corpus, (str, Path)):
        return load_documents(str(corpus), chunk_chars)
    docs = [d if isinstance(d, Document) else Document(d, "documents") for d in corpus]
    for i, d in enumerate(docs):
        if not isinstance(d.text, str):
            raise DataError(f"document {i}: expected str, got {type(d.text).__name__}")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError("corpus is empty (no non-blank documents)")
    return docs


def _write_split(
    path: Path,
    texts: list[str],
    tok: Tokenizer,
    dtype: np.dtype,
    eos: int,
    batch_docs: int,
    desc: str,
    progress: bool,
) -> int:
    """Encode ``texts`` in batches and append ids (+ eos per document) to ``path``; returns the token count."""
    from tqdm import tqdm

    n_tokens = 0
    start = time.perf_counter()
    with open(path, "wb") as f, tqdm(total=len(texts), desc=desc, unit="doc", disable=not progress) as bar:
        for i in range(0, len(texts), batch_docs):
            batch = tok.encode_batch(texts[i : i + batch_docs], split_special_tokens=True)
            flat: list[int] = []
            for ids in batch:
                flat.extend(ids)
                flat.append(eos)
            np.asarray(flat, dtype=dtype).tofile(f)
            n_tokens += len(flat)
            bar.update(len(batch))
            bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - start, 1e-9):,.0f} tok/s")
    return n_tokens


def prepare_dataset(
    corpus: str | Path | Sequence[str] | Sequence[Document],
    tokenizer: Tokenizer | str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    clean: bool | CleanConfig = True,
    split_by: str = "document",
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    batch_docs: int = 256,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Clean, split and tokenize ``corpus`` into ``out_dir`` (written atomically); returns ``meta.json``.

    Args:
        corpus: a bundled corpus name, a ``.txt``/``.jsonl`` file or directory, or documents (strings or
            :class:`Document`).
        tokenizer: a :class:`Tokenizer` or a directory/``tokenizer.json`` to load one from.
        val_fraction: share of documents (``split_by="document"``) or of text (``"source"``) held out.
        seed: the split is a pure function of the cleaned documents and the seed.
        clean: ``True`` for the default :class:`CleanConfig`, a config, or ``False`` to skip cleaning.
        split_by: ``"document"`` or ``"source"`` (whole books/files held out).
        extra_meta: more ``meta.json`` entries (e.g. the realized shares of a corpus mixture).
    """
    from llmlab.model.checkpoint import atomic_write_dir

    # Check the cheap parameters before the (possibly long) cleaning pass.
    if batch_docs < 1:
        raise ConfigError(f"batch_docs must be positive, got {batch_docs}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if split_by not in ("document", "source"):
        raise ConfigError(f"split_by must be 'document' or 'source', got {split_by!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META_FILE).is_file())):
        # The output directory is replaced as a whole: never do that to something that is not a dataset.
        raise DataError(f"{out}: exists and is not a prepared dataset; refusing to replace it")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)
    eos = tok.eos_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos token; documents could not be separated")
    docs = _as_documents(corpus, chunk_chars)
    clean_cfg = CleanConfig() if clean is True else (clean or None)

    report: CleaningReport | None = None
    if clean_cfg is not None:
        result = clean_documents([d.text for d in docs], clean_cfg, progress=progress)
        report = result.report
        docs = [Document(text, docs[i].source) for text, i in zip(result.texts, result.index)]
        if not docs:
            raise DataError("cleaning removed every document; try clean preset 'light' or --no-clean")
    train_idx, val_idx = split_documents(docs, val_fraction, seed, by=split_by)
    splits = {"train": [docs[i].text for i in train_idx], "val": [docs[i].text for i in val_idx]}
    dtype = token_dtype(tok.vocab_size)
    meta: dict[str, Any] = {
        "format": "llmlab-tokens",
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": eos,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "corpus": str(corpus) if isinstance(corpus, (str, Path)) else f"<{len(corpus)} documents>",
        "seed": seed,
        "val_fraction": val_fraction,
        "split_by": split_by,
        "clean": asdict(clean_cfg) if clean_cfg is not None else None,
        "splits": {},
        "val_text": VAL_TEXT_FILE,
        **(extra_meta or {}),
    }

    def write(tmp: Path) -> None:
        for name, texts in splits.items():
            n_tokens = _write_split(
                tmp / f"{name}.bin", texts, tok, dtype, eos, batch_docs, f"tokenize {name}", progress
            )
            meta["splits"][name] = {
                "tokens": n_tokens,
                "documents": len(texts),
                "bytes": sum(len(t.encode("utf-8")) + 1 for t in texts),
            }
        val_bytes = "".join(t + "\n" for t in splits["val"]).encode("utf-8")
        (tmp / VAL_TEXT_FILE).write_bytes(val_bytes)
        meta["compression"] = {"val": compression_baselines(val_bytes)}
        if report is not None:
            report.save(tmp / REPORT_FILE)
        tok.save(tmp / TOKENIZER_DIR)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    atomic_write_dir(out_dir, write)
    if report is not None:
        meta["cleaning_report"] = report  # for the caller only; the JSON copy is cleaning_report.json
    return meta
