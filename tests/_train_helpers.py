"""Shared fixtures for the trainer tests: a byte-level token shard of real text and a tiny model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from llmlab.model.config import ModelConfig

ASSET = Path(__file__).resolve().parents[1] / "llmlab" / "assets" / "corpora" / "tinyshakespeare.txt.gz"
EOS = 256  # byte ids 0..255, then an end-of-document id


def byte_shards(directory: Path, n_bytes: int = 60_000) -> Path:
    """Write ``meta.json``/``train.bin``/``val.bin`` of byte-level tokens of tiny-shakespeare (90/10 split)."""
    text = gzip.decompress(ASSET.read_bytes())[:n_bytes]
    cut = int(len(text) * 0.9)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, chunk in (("train", text[:cut]), ("val", text[cut:])):
        ids = np.frombuffer(chunk, dtype=np.uint8).astype(np.uint16)
        ids = np.concatenate([ids, np.array([EOS], dtype=np.uint16)])
        ids.tofile(directory / f"{name}.bin")
        splits[name] = {"tokens": int(len(ids)), "documents": 1, "bytes": len(chunk)}
    meta = {"dtype": "uint16", "vocab_size": 257, "eos_id": EOS, "splits": splits}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=257, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)
