"""Pretraining from a config: prepare the data if needed, build the model, run the :class:`Trainer`.

``run_pretrain(cfg, out_dir)`` is what ``llmlab pretrain`` and the demo call. It works the same under
``torchrun`` (rank 0 prepares the data, every rank reads its rows of each global batch).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmlab.config import build_config, from_dict, parse_overrides, qualify_key, set_key
from llmlab.data.clean import CLEAN_PRESETS, CleanConfig, clean_documents
from llmlab.data.corpora import DEFAULT_CHUNK_CHARS, Document, load_documents, split_documents
from llmlab.data.loader import META_FILE, PackedLoader, iterate_split, read_meta
from llmlab.data.mixture import ReplayLoader
from llmlab.data.prepare import prepare_dataset
from llmlab.errors import CheckpointError, ConfigError, DataError
from llmlab.losses.mlm import MaskedBatches, mlm_loss
from llmlab.model.checkpoint import read_config
from llmlab.model.config import MODEL_PRESETS, ModelConfig
from llmlab.model.transformer import Transformer
from llmlab.tokenizer import TOKENIZER_FILE, Tokenizer
from llmlab.tokenizer.train import train_tokenizer
from llmlab.train import distributed as dist_utils
from llmlab.train.config import TrainConfig
from llmlab.train.continual import (
    apply_model_overrides,
    check_vocab_match,
    init_model_config,
    load_init_model,
    with_extra_eval,
)
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
    chunk_chars: int = DEFAULT_CHUNK_CHARS  # size of paragraph-block documents (large: long documents)
    # continual pre-training: this fraction of every batch's rows comes from an old-domain shard directory
    replay_dir: str | None = None
    replay_fraction: float = 0.0

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data config: 'val_fraction' must be in (0, 1), got {self.val_fraction}")
        if self.vocab_size < 256:
            raise ConfigError(f"data config: 'vocab_size' must be >= 256, got {self.vocab_size}")
        if not 0.0 <= self.replay_fraction < 1.0 or (self.replay_fraction > 0 and not self.replay_dir):
            raise ConfigError(
                f"data config: 'replay_fraction' must be in [0, 1) and needs 'replay_dir', got {self.replay_fraction}"
            )


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    init_from: str | None = None  # continual pre-training: start from this model's weights and tokenizer
    # "clm": next-token prediction (a decoder); "mlm": BERT's masked LM on a bidirectional model
    # (model.causal is set false), corrupting mlm_probability of the tokens (llmlab.losses.mlm)
    objective: str = "clm"
    mlm_probability: float = 0.15

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"config key 'objective' must be one of {list(OBJECTIVES)}, got {self.objective!r}"
            )
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"config key 'mlm_probability' must be in (0, 1), got {self.mlm_probability}")
        if self.objective == "clm" and not self.model.causal:
            raise ConfigError(
                "config key 'model.causal' is false with objective=clm: a bidirectional model sees the token "
                "it must predict (use objective=mlm)"
            )
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


OBJECTIVES = ("clm", "mlm")
REPORT_FILE = "pretrain_report.json"
CONFIG_KEY = "pretrain"  # where a checkpoint's config.json keeps the whole PretrainConfig


# ------------------------------------------------------------------------------------------- config
def load_pretrain_config(
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    init_from: str | Path | None = None,
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
    cfg = build_config(PretrainConfig, PRETRAIN_PRESETS, preset, yaml_path, overrides)
    if init_from is not None:  # the model is the loaded one; only the user's model.* overrides apply
        model_cfg = init_model_config(init_from)
        cfg.model = apply_model_overrides(model_cfg, overrides or [], PretrainConfig, init_from)
        cfg.init_from = str(init_from)
        cfg.validate()
    return cfg


# --------------------------------------------------------------------------------------------- data
def ensure_dataset(
    data: DataConfig, is_main: bool = True, progress: bool = True, tokenizer: Tokenizer | None = None
) -> Path:
    """The prepared token-shard directory of ``data``; prepared from ``data.corpus`` when missing.

    Preparation cleans the corpus, splits it by document, trains a BPE tokenizer on the *train* documents only
    (so the held-out text never shapes the vocabulary) and tokenizes both splits with the data stage's
    ``prepare_dataset``. Only rank 0 prepares; the other ranks wait at a barrier.
    """

    directory = Path(data.dir)
    if not (directory / META_FILE).is_file() and is_main:
        prepare_corpus(data, progress, tokenizer)
    dist_utils.barrier()
    if not (directory / META_FILE).is_file():
        raise DataError(f"{directory}: no prepared dataset here (missing {META_FILE})")
    return directory


def prepare_corpus(
    data: DataConfig, progress: bool = True, tokenizer: Tokenizer | None = None
) -> dict[str, Any]:
    """Clean + split ``data.corpus``, train the tokenizer on the train split, write shards to ``data.dir``."""

    docs = load_documents(data.corpus, data.chunk_chars)
    if data.clean != "none":
        clean_cfg = build_config(CleanConfig, CLEAN_PRESETS, data.clean)
        result = clean_documents([d.text for d in docs], clean_cfg, progress=progress)
        docs = [Document(text, docs[i].source) for text, i in zip(result.texts, result.index)]
    # prepare_dataset splits these same documents with the same seed, so this is exactly its train split.
    train_idx, _ = split_documents(docs, data.val_fraction, data.seed)
    if tokenizer is not None:  # continual pre-training: the model's own tokenizer
        tok = tokenizer
    elif data.tokenizer:
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
    init_model = init_tokenizer = None
    if cfg.init_from:
        init_model, init_tokenizer = load_init_model(cfg.init_from, cfg.model)
    data_dir = ensure_dataset(cfg.data, info.is_main, cfg.train.progress, init_tokenizer)
    meta = read_meta(data_dir)
    tokenizer = load_dataset_tokenizer(data_dir, cfg.data)
    if init_model is not None:
        check_vocab_match(cfg.init_from, cfg.model, init_tokenizer, data_dir, meta, tokenizer)
        tokenizer = init_tokenizer or tokenizer
    data_vocab = int(meta.get("vocab_size", cfg.model.vocab_size))
    if init_model is None and (data_vocab > cfg.model.vocab_size or data_vocab < cfg.model.vocab_size // 2):
        # The model must cover every token id of the data; a far larger table only wastes parameters.
        cfg.model.vocab_size = data_vocab
    mask_id = None
    if cfg.objective == "mlm":  # an encoder: bidirectional attention, a [MASK] id after the data's vocabulary
        mask_id = tokenizer.add_mask_token() if tokenizer is not None else data_vocab
        cfg.model.causal = False
        cfg.model.vocab_size = max(cfg.model.vocab_size, mask_id + 1)
    torch.manual_seed(cfg.train.seed)
    model = init_model if init_model is not None else Transformer(cfg.model)
    t = cfg.train
    source = PackedLoader(data_dir, "train", t.batch_size, t.seq_len, t.seed, info.rank, info.world_size)
    replay_dir = Path(cfg.data.replay_dir) if cfg.data.replay_dir else None
    if replay_dir is not None:  # continual pre-training with replay of the old domain (same tokenizer)
        check_vocab_match(
            cfg.init_from or "model", cfg.model, tokenizer, replay_dir, read_meta(replay_dir),
            load_dataset_tokenizer(replay_dir, DataConfig()),
        )  # fmt: skip
        source = ReplayLoader(
            data_dir, replay_dir, cfg.data.replay_fraction, "train", t.batch_size, t.seq_len, t.seed,
            info.rank, info.world_size,
        )  # fmt: skip
    val = meta.get("splits", {}).get("val", {})
    bytes_per_token = val["bytes"] / val["tokens"] if val.get("bytes") and val.get("tokens") else None
    eval_fn = make_eval_fn(
        lambda: iterate_split(data_dir, "val", t.seq_len, t.batch_size, t.eval_batches),
        bytes_per_token=bytes_per_token,
    )
    loss_fn = None
    if mask_id is not None:  # the same windows, corrupted; loss (and held-out ppl) on the masked tokens only
        masked = MaskedBatches(source, mask_id, data_vocab, cfg.mlm_probability, t.seed)
        source, loss_fn = masked, functools.partial(mlm_loss, z_loss_weight=t.z_loss_weight)
        eval_fn = make_eval_fn(
            lambda: masked.iterate(iterate_split(data_dir, "val", t.seq_len, t.batch_size, t.eval_batches)),
            loss_fn=mlm_loss,
        )
    if replay_dir is not None:  # also track the old domain's held-out loss: forgetting, live
        eval_fn = with_extra_eval(
            eval_fn,
            "replay",
            lambda: iterate_split(replay_dir, "val", t.seq_len, t.batch_size, t.eval_batches),
        )
    extra = {CONFIG_KEY: dataclasses.asdict(cfg)}
    trainer = Trainer(
        model, t, source, loss_fn, eval_fn, tokenizer=tokenizer, out_dir=out_dir, extra_config=extra
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
