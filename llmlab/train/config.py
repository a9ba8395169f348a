"""The training loop's config, :class:`TrainConfig` (pretraining's own, model + loop + data, is
:class:`llmlab.recipes.pretrain.PretrainConfig`).

Both are typed dataclasses read by :func:`llmlab.config.build_config` (preset, then YAML, then ``key=value``
overrides), so ``llmlab pretrain --preset tiny train.max_steps=50 model.n_layers=2`` works and a misspelt key
is rejected by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmlab.errors import ConfigError

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
    datasheet_tflops: float | None = None  # datasheet peak for mfu_datasheet; None: by GPU name (CPU: none)
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
    # stability (llmlab.losses.stability, llmlab.train.layer_stats): PaLM's output z-loss
    # ``z_loss_weight * mean log(Z)^2`` added to the default LM loss (0: off; PaLM used 1e-4), and per-layer
    # activation / gradient norms in the step metrics, so a spike can be traced to its layer
    z_loss_weight: float = 0.0
    log_layer_norms: bool = False

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
        if not 0.0 <= self.z_loss_weight < 1.0:
            raise bad(f"'z_loss_weight' must be in [0, 1), got {self.z_loss_weight}")
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            raise bad(f"'rollback_lr_factor' must be in (0, 1], got {self.rollback_lr_factor}")
