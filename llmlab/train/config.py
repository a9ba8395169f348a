"""Training configs: :class:`TrainConfig` (the loop) and :class:`PretrainConfig` (model + loop + data).

Both are typed dataclasses read by :func:`llmlab.config.build_config` (preset, then YAML, then ``key=value``
overrides), so ``llmlab pretrain --preset tiny train.max_steps=50 model.n_layers=2`` works and a misspelt key
is rejected by name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from llmlab.errors import ConfigError
from llmlab.model.config import MODEL_PRESETS, ModelConfig

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("bf16", "fp32")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Optimizer, schedule, batching, evaluation, checkpointing and precision of one training run.

    ``batch_size`` is the micro-batch per process; one optimizer step sees
    ``batch_size * grad_accum_steps * world_size`` sequences.
    """

    # optimizer (AdamW; 1-D params - biases, norms - and embeddings get no weight decay)
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # schedule: linear warmup, then cosine to min_lr, or WSD (warmup-stable-decay: flat, then a linear
    # decay to min_lr over the last ``decay_frac`` of the run), or constant
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_frac: float = 0.2
    max_steps: int = 1000
    # batching
    batch_size: int = 8
    grad_accum_steps: int = 1
    seq_len: int = 256
    # evaluation / logging
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 20
    log_every: int = 10
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True
    plot: bool = True  # loss_curve.png at the end of fit()
    # checkpoints
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    # precision / speed
    precision: str = "bf16"
    compile: bool = False
    peak_tflops: float | None = None  # None: measured once with a large matmul (for MFU)
    device: str = "auto"  # auto: cuda if available, else cpu
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    seed: int = 0
    # Bitwise-reproducible steps: torch's deterministic algorithms (process-wide). Matters for compile=True
    # with several CPU threads, where inductor's embedding backward adds rows with atomic float adds in a
    # varying order; it then uses aten's sorted index_put instead (BENCHMARKS.md has the cost).
    deterministic: bool = False
    # loss-spike / NaN guard: skip a step whose loss is non-finite or > spike_factor x the running median of
    # the last ``spike_window`` good losses; after ``spike_patience`` skipped steps in a row, roll back to
    # the last checkpoint and multiply the learning rate by ``rollback_lr_factor``.
    spike_factor: float = 4.0  # 0 disables the spike test (non-finite losses are always skipped)
    spike_window: int = 50
    spike_min_history: int = 10  # no spike test before this many good steps
    spike_patience: int = 3
    rollback_lr_factor: float = 0.5

    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"train config: {msg}")

        if self.schedule not in SCHEDULES:
            raise bad(f"'schedule' must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise bad(f"'precision' must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.parallel not in PARALLEL:
            raise bad(f"'parallel' must be one of {list(PARALLEL)}, got {self.parallel!r}")
        for name in (
            "batch_size",
            "grad_accum_steps",
            "seq_len",
            "eval_batches",
            "log_every",
            "spike_window",
        ):
            if getattr(self, name) <= 0:
                raise bad(f"'{name}' must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "keep_last", "spike_patience"):
            if getattr(self, name) < 0:
                raise bad(f"'{name}' must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise bad(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise bad(f"'decay_frac' must be in [0, 1], got {self.decay_frac}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise bad(f"'betas' must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.spike_factor < 0:
            raise bad("'grad_clip', 'weight_decay' and 'spike_factor' must be >= 0")
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            raise bad(f"'rollback_lr_factor' must be in (0, 1], got {self.rollback_lr_factor}")


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


def preference_train_config(**overrides) -> TrainConfig:
    """Trainer defaults shared by the alignment stages (reward model, DPO-family, PPO, GRPO).

    fp32 (their losses compare small log-prob differences), no weight decay (it would pull the policy away
    from the reference), and no loss-spike guard (preference and RL losses legitimately sit near zero or jump
    between rollout batches; NaN/inf steps are still skipped).
    """
    return TrainConfig(**{"weight_decay": 0.0, "spike_factor": 0.0, "precision": "fp32", **overrides})
