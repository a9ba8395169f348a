"""The one training loop of llmlab: pretraining, SFT, reward models, DPO, PPO and GRPO all step through it.

A stage supplies a :class:`~llmlab.data.loader.BatchSource` and a loss function::

    loss_fn(model, batch) -> LossOutput(loss_sum, weight, metrics)

``loss_sum`` is the SUM of per-token (or per-example) losses of the micro-batch and ``weight`` how many
tokens/examples it covers. The trainer backpropagates the sums and divides the gradients by the total weight
of the whole optimizer step (all micro-batches, all ranks), so gradient accumulation and data parallelism give
exactly the gradient of one big batch, even when micro-batches hold different numbers of real tokens.

Around that: AdamW with a warmup + cosine/WSD schedule, clipping, bf16 autocast, optional ``torch.compile``,
periodic evaluation, JSONL/TensorBoard logs, a progress bar with tokens/s and MFU, a NaN/loss-spike guard with
rollback, and atomic, world-size-independent checkpoints that resume bit-exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.errors import CheckpointError
from llmlab.train import distributed as dist_utils
from llmlab.train import state as st
from llmlab.train.config import TrainConfig
from llmlab.train.fused_ce import fused_linear_cross_entropy, logits_cross_entropy
from llmlab.train.logging import PLOT_FILE, MetricsLogger, plot_loss_curve
from llmlab.train.optim import build_optimizer, lr_at
from llmlab.train.perf import measure_peak_tflops, mfu, retain_freed_cpu_memory


@dataclass
class LossOutput:
    """What a loss function returns for one micro-batch (see the module docstring)."""

    loss_sum: Tensor
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


LossFn = Callable[[nn.Module, dict[str, Tensor]], LossOutput]
EvalFn = Callable[[nn.Module], dict[str, float]]

MODEL_KWARGS = ("positions", "segment_ids", "attention_mask")


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
    """Next-token cross-entropy summed over ``labels != -100`` (labels are already shifted by the loader).

    For an llmlab Transformer with a plain output head (one process or DDP) the head matmul and the loss are
    fused and chunked (:mod:`llmlab.train.fused_ce`). Otherwise (FSDP, an adapted or quantized head) full
    logits go through ``F.cross_entropy``; inside ``torch.compile``, which fuses the plain path itself, they go
    through :func:`~llmlab.train.fused_ce.logits_cross_entropy`, whose backward inductor fuses into one pass.
    """
    kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
    labels = batch["labels"]
    weight = None if torch.compiler.is_compiling() else _plain_head_weight(model)
    if weight is not None:
        hidden = model(batch["input_ids"], return_hidden=True, **kwargs)
        loss_sum = fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1)
        )
    else:
        logits = model(batch["input_ids"], **kwargs)
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        if torch.compiler.is_compiling():
            loss_sum = logits_cross_entropy(flat_logits, flat_labels)
        else:
            loss_sum = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=-100, reduction="sum")
    return LossOutput(loss_sum, float((labels != -100).sum()))


def _plain_head_weight(model: nn.Module) -> Tensor | None:
    """The output-head weight when ``model`` computes logits as ``hidden @ weight.T`` and nothing else."""
    from llmlab.model.transformer import Transformer

    inner = dist_utils.unwrap(model)
    if not isinstance(inner, Transformer) or hasattr(inner, "reshard"):  # FSDP2 modules have .reshard()
        return None
    head = inner.lm_head
    if head is None:
        weight = inner.embed_tokens.weight
    elif type(head) is nn.Linear and head.bias is None:
        weight = head.weight
    else:
        return None  # LoRA / quantized / biased heads keep their own forward
    if type(weight) is not nn.Parameter and type(weight) is not Tensor:  # DTensor or a quantized tensor
        return None
    return weight


class _StateView:
    """Duck-types the parts of a Transformer that ``save_checkpoint`` reads, over a gathered state dict."""

    def __init__(self, cfg: Any, state: dict[str, Tensor]):
        self.cfg, self._state = cfg, state

    def state_dict(self) -> dict[str, Tensor]:
        return self._state


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``loss_fn`` over ``train_source`` (see the module docstring).

    Under ``torchrun`` the trainer joins the process group, wraps the model in DDP or FSDP2 and logs and saves
    on rank 0 only. ``train_source`` must already yield this rank's rows.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        train_source: Any,
        loss_fn: LossFn | None = None,
        eval_fn: EvalFn | None = None,
        tokenizer: Any | None = None,
        out_dir: str | Path | None = None,
        extra_config: dict[str, Any] | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.train_source = train_source
        self.loss_fn: LossFn = loss_fn or causal_lm_loss
        self.eval_fn = eval_fn
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.extra_config = dict(extra_config or {})
        self.dist = dist_utils.setup(cfg.device)
        self.device = self.dist.device
        if self.device.type == "cpu":
            retain_freed_cpu_memory()  # no page faults on every step's activations (see perf.py)
        if cfg.deterministic:
            if self.device.type == "cuda":  # cuBLAS reads this when its first handle is made
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.model = model.to(self.device)  # the user's module (FSDP2 shards it in place)
        self.model.train()
        self.wrapped = dist_utils.wrap_model(self.model, self.dist, cfg.parallel)
        self.forward_model = self.wrapped
        if cfg.compile:
            # RoPE's table-length check (``int(positions.max())``) is a known, harmless graph break: one
            # extra graph per step. Keep dynamo's multi-line warning about it out of the user's console.
            logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
            if loss_fn is None:
                # Compile the model and the cross-entropy as one graph: inductor fuses the norms, RoPE, SwiGLU
                # and the log-softmax, which on CPU are a large share of a small model's step.
                self.loss_fn = torch.compile(causal_lm_loss)
            else:
                self.forward_model = torch.compile(self.wrapped)
        self.optimizer = build_optimizer(self.wrapped, cfg)

        self.step = 0  # optimizer steps taken (skipped ones included)
        self.lr_scale = 1.0  # lowered by each rollback
        self.tokens_seen = 0
        self.loss_history: deque[float] = deque(maxlen=cfg.spike_window)
        self.bad_steps_in_row = 0
        self.last_metrics: dict[str, float] = {}
        self._peak: float | None = cfg.peak_tflops
        self.logger = MetricsLogger(out_dir, enabled=self.dist.is_main, tensorboard=cfg.tensorboard)
        torch.manual_seed(cfg.seed + self.dist.rank)

    # ------------------------------------------------------------------------------------- helpers
    @property
    def unwrapped(self) -> nn.Module:
        return dist_utils.unwrap(self.wrapped)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return dist_utils.to_device(batch, self.device)

    def _grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if not self.dist.enabled:
            return contextlib.nullcontext()
        if hasattr(self.wrapped, "no_sync"):  # DDP
            return contextlib.nullcontext() if enabled else self.wrapped.no_sync()
        if hasattr(self.wrapped, "set_requires_gradient_sync"):  # FSDP2
            self.wrapped.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def _trainable(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # ---------------------------------------------------------------------------------- one step
    def train_step(self, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        """One optimizer step over ``batches`` (the micro-batches of this rank).

        Returns the step's metrics: ``loss`` (total loss_sum / total weight over all ranks), ``lr``,
        ``grad_norm``, ``tokens`` (global), ``skipped`` (1 if the guard refused the step) and the
        weight-averaged metrics of the loss function.
        """
        cfg = self.cfg
        lr = lr_at(self.step, cfg) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        weight_total, tokens = 0.0, 0
        metric_sums: dict[str, float] = {}
        for i, batch in enumerate(batches):
            batch = self._to_device(batch)
            with self._grad_sync(i == len(batches) - 1):
                with self.autocast():
                    out = self.loss_fn(self.forward_model, batch)
                out.loss_sum.backward()
            loss_total += out.loss_sum.detach().double()
            weight_total += float(out.weight)
            tokens += _count_tokens(batch)
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v) * float(out.weight)

        # Global totals: one all-reduce for loss, weight, tokens and every metric.
        keys = sorted(metric_sums)
        local = [loss_total.item(), weight_total, float(tokens), *[metric_sums[k] for k in keys]]
        loss_g, weight_g, tokens_g, *metric_g = dist_utils.all_reduce_sum(local, self.device)
        loss = loss_g / weight_g if weight_g > 0 else float("nan")

        # Gradients hold sum-over-this-rank (DDP/FSDP average over ranks): rescale to the global mean.
        scale = self.dist.world_size / weight_g if weight_g > 0 else 1.0
        grad_norm = self._scale_and_clip(scale)

        reason = self._guard(loss, grad_norm)
        skipped = reason is not None
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps_in_row += 1
            self.logger.event(self.step, "skip_step", reason=reason, loss=loss, grad_norm=grad_norm)
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.loss_history.append(loss)
            self.bad_steps_in_row = 0
        # This step's factor (see _scale_and_clip) must not leak into the next.
        self.optimizer.grad_scale = None
        self.step += 1
        self.tokens_seen += int(tokens_g)
        metrics = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens_g,
            "skipped": float(skipped),
        }
        metrics.update({k: v / weight_g for k, v in zip(keys, metric_g)} if weight_g > 0 else {})
        if skipped and self.bad_steps_in_row >= max(self.cfg.spike_patience, 1):
            self._rollback()
        return metrics

    def _scale_and_clip(self, scale: float) -> float:
        """Multiply the gradients by ``scale``, clip their global norm to ``cfg.grad_clip`` and return the
        (scaled, unclipped) norm.

        With a fused AdamW and plain tensors the gradients are not touched here: one norm pass, and the
        combined factor goes to the optimizer's ``grad_scale``, which the fused kernel divides by as it
        reads each gradient. Scaling and clipping in place would be two more read-write passes over every
        gradient (measured ~2.5 ms of a ~240 ms ``small-14m`` CPU step). DTensor (FSDP2) gradients and unfused
        optimizers take the in-place route.
        """
        params = [p for p in self._trainable() if p.grad is not None]
        grads = [p.grad for p in params]
        if not grads:
            return 0.0
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        fused = all(g.get("fused") for g in self.optimizer.param_groups)
        if fused and _foreach_ok(grads):
            norm = float(torch.nn.utils.get_total_norm(grads)) * scale
            if not math.isfinite(norm):
                return norm  # the guard skips this step
            factor = scale * min(1.0, max_norm / (norm + 1e-6))
            if factor > 1e-30:  # else (an absurd norm) its inverse would overflow: take the in-place route
                # grad_scale is the hook torch's GradScaler uses; the kernel computes grad / grad_scale.
                self.optimizer.grad_scale = torch.tensor(1.0 / factor, device=grads[0].device)
                return norm
        if scale != 1.0:
            if _foreach_ok(grads):
                torch._foreach_mul_(grads, scale)
            else:
                for g in grads:
                    g.mul_(scale)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _guard(self, loss: float, grad_norm: float) -> str | None:
        """Why this step must be skipped, or None. All ranks see the same global numbers, so agree."""
        if not math.isfinite(loss):
            return "non-finite loss"
        if not math.isfinite(grad_norm):
            return "non-finite grad norm"
        cfg = self.cfg
        # The ratio test needs a positive loss scale (CE, DPO); RL objectives that go negative skip it.
        history = self.loss_history
        if cfg.spike_factor > 0 and len(history) >= cfg.spike_min_history and min(history) > 0:
            median = statistics.median(self.loss_history)
            if loss > cfg.spike_factor * median:
                return f"loss spike ({loss:.4g} > {cfg.spike_factor} x median {median:.4g})"
        return None

    def _rollback(self) -> None:
        """Back to the last checkpoint with a lower LR. The data position keeps moving forward, so the
        batches that caused the spikes are not replayed."""
        new_scale = self.lr_scale * self.cfg.rollback_lr_factor
        latest = st.find_latest(self.out_dir) if self.out_dir is not None else None
        from_step = self.step
        if latest is not None:
            self.load(latest, restore_data=False, restore_rng=False)
        self.lr_scale = new_scale
        self.bad_steps_in_row = 0
        self.logger.event(
            from_step,
            "rollback",
            to_step=self.step,
            checkpoint=str(latest) if latest else None,
            lr_scale=new_scale,
        )
        if self.dist.is_main:
            where = f"to {latest.name}" if latest is not None else "(no checkpoint yet: LR lowered only)"
            print(
                f"[llmlab] {self.cfg.spike_patience} bad steps in a row at step {from_step}: rolled back {where}, "
                f"LR x{new_scale:g}"
            )

    # ------------------------------------------------------------------------------------- the run
    def fit(self) -> dict[str, float]:
        """Train until ``max_steps``; evaluate, log and checkpoint on the way; save ``out/final``."""
        cfg = self.cfg
        if self.step == 0:
            self.logger.reset()  # a new run: don't mix in the metrics of an earlier run in this directory
        bar = None
        if self.dist.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        window_tokens, window_time, window_losses = 0.0, 0.0, []
        try:
            while self.step < cfg.max_steps:
                try:
                    batches = [self.train_source.next_batch() for _ in range(cfg.grad_accum_steps)]
                except StopIteration:
                    self.logger.event(self.step, "data_exhausted")
                    break
                t0 = time.perf_counter()
                m = self.train_step(batches)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                window_time += time.perf_counter() - t0
                window_tokens += m["tokens"]
                if not m["skipped"]:
                    window_losses.append(m["loss"])
                if bar is not None:
                    bar.update(self.step - bar.n)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    m.update(self._throughput(window_tokens, window_time, batches))
                    if window_losses:
                        m["loss"] = sum(window_losses) / len(window_losses)  # mean over the log window
                    self.logger.log(self.step, m)
                    self.last_metrics.update(m)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{m['loss']:.3f}",
                            tok_s=f"{m['tokens_per_s']:.0f}",
                            mfu=f"{100 * m['mfu']:.1f}%",
                        )
                    window_tokens, window_time, window_losses = 0.0, 0.0, []
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    self.evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        self.evaluate()
        if self.out_dir is not None:
            self.save()
            self.save_final()
            if cfg.plot and self.dist.is_main and self.logger.path is not None and self.logger.path.exists():
                plot_loss_curve(self.logger.path, self.out_dir / PLOT_FILE)
        self.logger.close()
        return dict(self.last_metrics)

    def _throughput(self, tokens: float, seconds: float, batches: list[dict]) -> dict[str, float]:
        tps = tokens / seconds if seconds > 0 else 0.0
        out = {"tokens_per_s": tps, "mfu": 0.0}
        model_cfg = getattr(self.unwrapped, "cfg", None)
        if model_cfg is not None and batches and "input_ids" in batches[0]:
            from llmlab.model.transformer import flops_per_token

            if self._peak is None:
                dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32
                self._peak = measure_peak_tflops(self.device, dtype)
            fpt = flops_per_token(model_cfg, int(batches[0]["input_ids"].shape[1]), training=True)
            out["mfu"] = mfu(tps, fpt, self._peak, self.dist.world_size)
        return out

    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` (on every rank: FSDP needs all of them) and log its metrics under ``val``."""
        if self.eval_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = self.eval_fn(self.wrapped)
        self.model.train(was_training)
        self.logger.log(self.step, metrics, prefix="val")
        self.last_metrics.update(
            {f"val_{k}" if not k.startswith("val") else k: v for k, v in metrics.items()}
        )
        return metrics

    # ------------------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "lr_scale": self.lr_scale,
            "tokens_seen": self.tokens_seen,
            "loss_history": list(self.loss_history),
            "bad_steps_in_row": self.bad_steps_in_row,
            "data": self.train_source.state_dict() if hasattr(self.train_source, "state_dict") else {},
            "rng": st.rng_state(),
            "world_size": self.dist.world_size,
            "train_config": asdict(self.cfg),
        }

    def _has_frozen(self) -> bool:
        """Whether some parameters are frozen (LoRA, QLoRA, frozen layers): resume checkpoints then hold only
        the trainable ones, since the caller rebuilds the frozen base before resuming."""
        return any(not p.requires_grad for p in self.unwrapped.parameters())

    def _gather(self, trainable_only: bool = False) -> tuple[dict[str, Tensor], dict]:
        """Full model (or only trainable) and optimizer state (collective under FSDP)."""
        model_state = dist_utils.full_model_state(self.wrapped, trainable_only=trainable_only)
        optim_state = dist_utils.full_optimizer_state(self.wrapped, self.optimizer)
        return model_state, optim_state

    def save(self) -> Path | None:
        """Write ``out/ckpt-STEP/`` (model, tokenizer, optimizer, RNG, data position) and ``out/latest``.

        With frozen parameters the weights file is ``trainable.safetensors`` with the trainable tensors only
        (see :mod:`llmlab.train.state`).
        """
        if self.out_dir is None:
            return None
        from llmlab.model.checkpoint import TRAINABLE_ONLY_KEY, WEIGHTS_FILE, save_checkpoint

        partial = self._has_frozen()
        model_state, optim_state = self._gather(trainable_only=partial)
        path = self.out_dir / st.ckpt_name(self.step)
        if self.dist.is_main:
            trainer_state = self.trainer_state()
            view = _StateView(self.unwrapped.cfg, model_state)
            extra = {**self.extra_config, "train": asdict(self.cfg), "step": self.step}
            if partial:
                extra[TRAINABLE_ONLY_KEY] = True
            save_checkpoint(
                path,
                view,
                self.tokenizer,
                extra_config=extra,
                extra_files=lambda d: st.write_training_state(d, optim_state, trainer_state),
                weights_file=st.TRAINABLE_FILE if partial else WEIGHTS_FILE,
            )
            st.write_latest(self.out_dir, path.name)
            st.prune_checkpoints(self.out_dir, self.cfg.keep_last, protect=path)
            self.logger.event(self.step, "checkpoint", path=str(path))
        dist_utils.barrier()
        return path

    def save_final(self) -> Path | None:
        """``out/final/``: a plain llmlab checkpoint (model + tokenizer) for ``llmlab.load``."""
        if self.out_dir is None:
            return None
        from llmlab.model.checkpoint import save_checkpoint

        model_state = dist_utils.full_model_state(self.wrapped)
        path = self.out_dir / "final"
        if self.dist.is_main:
            extra = {**self.extra_config, "train": asdict(self.cfg), "step": self.step}
            save_checkpoint(
                path, _StateView(self.unwrapped.cfg, model_state), self.tokenizer, extra_config=extra
            )
        dist_utils.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from ``path`` or from ``out/latest``; returns False when there is nothing to resume."""
        if path is None:
            if self.out_dir is None:
                return False
            path = st.find_latest(self.out_dir)
            if path is None:
                return False
        self.load(path)
        if self.dist.is_main:
            print(f"[llmlab] resumed from {path} at step {self.step}")
        return True

    def load(self, path: str | Path, restore_data: bool = True, restore_rng: bool = True) -> None:
        """Load model, optimizer and loop state from a checkpoint dir (any world size wrote it).

        A trainable-only checkpoint (a run with frozen parameters) must match this model's trainable
        parameters exactly; the frozen ones are left as the caller built them.
        """
        from llmlab.model.checkpoint import TRAINABLE_ONLY_KEY, WEIGHTS_FILE, load_state_dict, read_config

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint directory not found")
        trainer_state, optim_state = st.read_training_state(path)
        partial = bool(read_config(path).get(TRAINABLE_ONLY_KEY))
        weights = path / (st.TRAINABLE_FILE if partial else WEIGHTS_FILE)
        model_state = load_state_dict(weights)
        if partial:
            own = {n: tuple(p.shape) for n, p in self.unwrapped.named_parameters() if p.requires_grad}
            hint = (
                f" (this checkpoint holds only the {len(model_state)} trainable tensors of its run: build the "
                "same model, base + adapters + frozen layers, before resuming)"
            )
        else:
            own = {k: tuple(v.shape) for k, v in self.unwrapped.state_dict().items()}
            hint = ""
        _check_names(own, model_state, str(weights), hint)
        try:
            dist_utils.load_full_state(
                self.wrapped, self.optimizer, model_state, optim_state, strict=not partial
            )
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot load training state ({exc})") from exc
        self.step = int(trainer_state["step"])
        self.lr_scale = float(trainer_state.get("lr_scale", 1.0))
        self.tokens_seen = int(trainer_state.get("tokens_seen", 0))
        self.loss_history = deque(trainer_state.get("loss_history", []), maxlen=self.cfg.spike_window)
        self.bad_steps_in_row = int(trainer_state.get("bad_steps_in_row", 0))
        if restore_data and trainer_state.get("data") and hasattr(self.train_source, "load_state_dict"):
            self.train_source.load_state_dict(trainer_state["data"])
        if restore_rng:
            st.set_rng_state(trainer_state["rng"])


def _count_tokens(batch: dict[str, Any]) -> int:
    """Tokens a micro-batch feeds the model: every ``*input_ids`` tensor (e.g. chosen + rejected for DPO)."""
    return sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, Tensor))


def _foreach_ok(tensors: list[Tensor]) -> bool:
    return not any(hasattr(t, "full_tensor") for t in tensors)  # DTensor grads: use per-tensor ops


def _check_names(
    own: dict[str, tuple[int, ...]], state: dict[str, Tensor], source: str, hint: str = ""
) -> None:
    """Name/shape check against ``own`` (name -> global shape, so sharded params work too) with an error
    naming the first bad tensor."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise CheckpointError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing){hint}")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} unexpected){hint}"
        )
    for k, shape in own.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor '{k}' has shape {tuple(state[k].shape)}, expected {shape}{hint}"
            )


def make_eval_fn(
    batches: Callable[[], Any],
    loss_fn: LossFn | None = None,
    bytes_per_token: float | None = None,
    device: torch.device | str | None = None,
) -> EvalFn:
    """An eval function: weighted mean of ``loss_fn`` over ``batches()``, as loss, perplexity and (when
    ``bytes_per_token`` is known) bits per byte = nats/token / ln 2 x tokens/byte."""
    loss_fn = loss_fn or causal_lm_loss

    def evaluate(model: nn.Module) -> dict[str, float]:
        dev = device if device is not None else next(model.parameters()).device
        total, weight = 0.0, 0.0
        for batch in batches():
            batch = {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in batch.items()}
            out = loss_fn(model, batch)
            total += float(out.loss_sum.detach())
            weight += float(out.weight)
        loss = total / weight if weight > 0 else float("nan")
        metrics = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        if bytes_per_token:
            metrics["bpb"] = loss / math.log(2) / bytes_per_token
        return metrics

    return evaluate
