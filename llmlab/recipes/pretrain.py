"""Pretraining from a config: prepare the data if needed, build the model, run the :class:`Trainer`.

``run_pretrain(cfg, out_dir)`` is what ``llmlab pretrain`` and the demo call. It works the same under
``torchrun`` (rank 0 prepares the data, every rank reads its rows of each global batch).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmlab.config import build_config, from_dict, parse_overrides, qualify_key, set_key
from llmlab.data.clean import CLEAN_PRESETS, CleanConfig, clean_documents
from llmlab.data.corpora import Document, load_documents, split_documents
from llmlab.data.loader import META_FILE, PackedLoader, iterate_split, read_meta
from llmlab.data.prepare import prepare_dataset
from llmlab.errors import CheckpointError, ConfigError, DataError
from llmlab.model.checkpoint import read_config
from llmlab.model.config import MODEL_PRESETS, ModelConfig
from llmlab.model.transformer import Transformer
from llmlab.tokenizer import TOKENIZER_FILE, Tokenizer
from llmlab.tokenizer.train import train_tokenizer
from llmlab.train import distributed as dist_utils
from llmlab.train.config import TrainConfig
from llmlab.train.evaluation import make_eval_fn
from llmlab.train.logging import write_report
from llmlab.train.state import find_latest
from llmlab.train.trainer import Trainer


@dataclass
class DataConfig:
    """Where pretraining tokens come from.

    ``dir`` is a prepared token-shard directory (``meta.json`` + ``train.bin`` + ``val.bin``). If it does not
    exist, it is prepared from ``corpus`` (a bundled corpus name or a text file) with a BPE tokenizer of
    ``vocab_size`` trained on it (``model.vocab_size`` is set to the tokenizer's size).
    """

    dir: str = "data/tinyshakespeare"
    corpus: str = "tinyshakespeare"
    vocab_size: int = 4096
    val_fraction: float = 0.1
    tokenizer: str | None = None  # an existing tokenizer.json / dir instead of training one
    clean: str = "default"  # cleaning preset of llmlab.data.clean (default, light, none)
    seed: int = 0  # of the train/val document split

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data config: 'val_fraction' must be in (0, 1), got {self.val_fraction}")
        if self.vocab_size < 256:
            raise ConfigError(f"data config: 'vocab_size' must be >= 256, got {self.vocab_size}")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"'train.seq_len' ({self.train.seq_len}) exceeds 'model.max_seq_len' ({self.model.max_seq_len})"
            )


def _tiny() -> PretrainConfig:
    return PretrainConfig(
        model=copy.deepcopy(MODEL_PRESETS["tiny"]),
        train=TrainConfig(
            lr=2e-3,
            min_lr=2e-4,
            warmup_steps=50,
            max_steps=600,
            batch_size=16,
            seq_len=256,
            eval_every=200,
            eval_batches=16,
            save_every=200,
            log_every=10,
            weight_decay=0.1,
        ),
        data=DataConfig(dir="data/tinyshakespeare", corpus="tinyshakespeare", vocab_size=4096),
    )


def _gpt2() -> PretrainConfig:
    return PretrainConfig(
        model=copy.deepcopy(MODEL_PRESETS["gpt2-124m"]),
        train=TrainConfig(
            lr=6e-4,
            min_lr=6e-5,
            warmup_steps=700,
            max_steps=20000,
            batch_size=16,
            grad_accum_steps=32,
            seq_len=1024,
            eval_every=500,
            eval_batches=50,
            save_every=1000,
            log_every=10,
            compile=True,
        ),
        data=DataConfig(dir="data/gutenberg-gpt2", corpus="gutenberg", vocab_size=50304),
    )


# Named presets for ``llmlab pretrain --preset NAME``.
PRETRAIN_PRESETS: dict[str, PretrainConfig] = {"tiny": _tiny(), "gpt2-124m": _gpt2()}


REPORT_FILE = "pretrain_report.json"
CONFIG_KEY = "pretrain"  # where a checkpoint's config.json keeps the whole PretrainConfig


# ------------------------------------------------------------------------------------------- config
def load_pretrain_config(
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> PretrainConfig:
    """Preset (default ``tiny``) or a saved config dict (``base``, when resuming), then YAML, then overrides
    (bare keys such as ``max_steps=100`` go to the one section that has them)."""
    if base is not None and preset is None and yaml_path is None:
        cfg = from_dict(PretrainConfig, base)
        for key, value in parse_overrides(overrides or []):
            set_key(cfg, qualify_key(PretrainConfig, key), value)
        for part in (cfg.model, cfg.train, cfg.data, cfg):
            part.validate()
        return cfg
    if preset is None and yaml_path is None:
        preset = "tiny"
    return build_config(PretrainConfig, PRETRAIN_PRESETS, preset, yaml_path, overrides)


# --------------------------------------------------------------------------------------------- data
def ensure_dataset(data: DataConfig, is_main: bool = True, progress: bool = True) -> Path:
    """The prepared token-shard directory of ``data``; prepared from ``data.corpus`` when missing.

    Preparation cleans the corpus, splits it by document, trains a BPE tokenizer on the *train* documents only
    (so the held-out text never shapes the vocabulary) and tokenizes both splits with the data stage's
    ``prepare_dataset``. Only rank 0 prepares; the other ranks wait at a barrier.
    """

    directory = Path(data.dir)
    if not (directory / META_FILE).is_file() and is_main:
        prepare_corpus(data, progress)
    dist_utils.barrier()
    if not (directory / META_FILE).is_file():
        raise DataError(f"{directory}: no prepared dataset here (missing {META_FILE})")
    return directory


def prepare_corpus(data: DataConfig, progress: bool = True) -> dict[str, Any]:
    """Clean + split ``data.corpus``, train the tokenizer on the train split, write shards to ``data.dir``."""

    docs = load_documents(data.corpus)
    if data.clean != "none":
        clean_cfg = build_config(CleanConfig, CLEAN_PRESETS, data.clean)
        result = clean_documents([d.text for d in docs], clean_cfg, progress=progress)
        docs = [Document(text, docs[i].source) for text, i in zip(result.texts, result.index)]
    # prepare_dataset splits these same documents with the same seed, so this is exactly its train split.
    train_idx, _ = split_documents(docs, data.val_fraction, data.seed)
    if data.tokenizer:
        tok = Tokenizer.from_file(data.tokenizer)
    else:
        t0 = time.perf_counter()
        tok = train_tokenizer((docs[i].text for i in train_idx), data.vocab_size, length=len(train_idx))
        print(f"[llmlab] trained a {tok.vocab_size}-token BPE tokenizer in {time.perf_counter() - t0:.1f}s")
    return prepare_dataset(
        docs, tok, data.dir, val_fraction=data.val_fraction, seed=data.seed, clean=False, progress=progress
    )


def load_dataset_tokenizer(directory: Path, data: DataConfig):
    """The tokenizer saved with the shards (or ``data.tokenizer``), or None for pre-tokenized data."""

    if data.tokenizer:
        return Tokenizer.from_file(data.tokenizer)
    for candidate in (directory / "tokenizer", directory):
        if (candidate / TOKENIZER_FILE).is_file():
            return Tokenizer.from_file(candidate)
    return None


# ---------------------------------------------------------------------------------------------- run
def build_trainer(cfg: PretrainConfig, out_dir: str | Path):
    """Dataset, model, loader, eval function and :class:`Trainer` for ``cfg`` (nothing trained yet)."""

    info = dist_utils.setup(cfg.train.device)
    data_dir = ensure_dataset(cfg.data, info.is_main, cfg.train.progress)
    meta = read_meta(data_dir)
    tokenizer = load_dataset_tokenizer(data_dir, cfg.data)
    data_vocab = int(meta.get("vocab_size", cfg.model.vocab_size))
    if data_vocab > cfg.model.vocab_size or data_vocab < cfg.model.vocab_size // 2:
        # The model must cover every token id of the data; a far larger table only wastes parameters.
        cfg.model.vocab_size = data_vocab
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    t = cfg.train
    source = PackedLoader(data_dir, "train", t.batch_size, t.seq_len, t.seed, info.rank, info.world_size)
    val = meta.get("splits", {}).get("val", {})
    bytes_per_token = val["bytes"] / val["tokens"] if val.get("bytes") and val.get("tokens") else None
    eval_fn = make_eval_fn(
        lambda: iterate_split(data_dir, "val", t.seq_len, t.batch_size, t.eval_batches),
        bytes_per_token=bytes_per_token,
    )
    extra = {CONFIG_KEY: dataclasses.asdict(cfg)}
    trainer = Trainer(
        model, t, source, eval_fn=eval_fn, tokenizer=tokenizer, out_dir=out_dir, extra_config=extra
    )
    return trainer, data_dir


def saved_config(out_dir: str | Path) -> dict[str, Any] | None:
    """The PretrainConfig dict stored in ``out/latest``'s checkpoint, for ``--resume`` without a preset."""

    latest = find_latest(out_dir)
    if latest is None:
        return None
    return read_config(latest).get(CONFIG_KEY)


def run_pretrain(cfg: PretrainConfig, out_dir: str | Path, resume: bool = False) -> dict[str, float]:
    """Train ``cfg`` into ``out_dir`` (``--resume``: continue from ``out_dir/latest``); returns final metrics."""

    trainer, _ = build_trainer(cfg, out_dir)
    if resume and not trainer.resume():
        raise CheckpointError(f"{out_dir}: nothing to resume (no 'latest' checkpoint)")
    metrics = trainer.fit()
    if trainer.dist.is_main:
        write_report(Path(out_dir) / REPORT_FILE, {"steps": trainer.step, **metrics})
    return metrics
