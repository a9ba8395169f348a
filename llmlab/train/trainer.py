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
import functools
import logging
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlab.losses.lm import MODEL_KWARGS, LossFn, LossOutput, causal_lm_loss
from llmlab.losses.stability import causal_lm_z_loss
from llmlab.model.transformer import flops_per_token
from llmlab.train import distributed as dist_utils
from llmlab.train import state as st
from llmlab.train.checkpointing import CheckpointMixin
from llmlab.train.config import TrainConfig
from llmlab.train.layer_stats import LayerStats
from llmlab.train.logging import PLOT_FILE, MetricsLogger, plot_loss_curve
from llmlab.train.optim import build_optimizer, lr_at
from llmlab.train.perf import datasheet_peak_tflops, measure_peak_tflops, mfu, retain_freed_cpu_memory

EvalFn = Callable[[nn.Module], dict[str, float]]

__all__ = ["MODEL_KWARGS", "EvalFn", "LossFn", "LossOutput", "Trainer", "causal_lm_loss"]


class Trainer(CheckpointMixin):
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
        # The default objective: causal LM, plus the output z-loss when train.z_loss_weight > 0.
        default_loss: LossFn = causal_lm_loss
        if cfg.z_loss_weight > 0:
            default_loss = functools.partial(causal_lm_z_loss, z_loss_weight=cfg.z_loss_weight)
        self.loss_fn: LossFn = loss_fn or default_loss
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
                self.loss_fn = torch.compile(default_loss)
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
        self.layer_stats = LayerStats(self.model) if cfg.log_layer_norms else None

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
        layer_metrics = self.layer_stats.collect(scale) if self.layer_stats is not None else {}
        grad_norm = self._scale_and_clip(scale)

        reason = self._guard(loss, grad_norm)
        skipped = reason is not None
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps_in_row += 1
            where = {"layer": self.layer_stats.culprit()} if self.layer_stats is not None else {}
            self.logger.event(self.step, "skip_step", reason=reason, loss=loss, grad_norm=grad_norm, **where)
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.loss_history.append(loss)
            if self.layer_stats is not None:
                self.layer_stats.commit()
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
        metrics.update(layer_metrics)
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
        # Re-base the spike test on the losses from here on. Kept, the old median (restored with the
        # checkpoint) fails every step when the loss level has moved for good: rollback after rollback to
        # the same checkpoint, the LR halved towards 0 and the run never ending (bench/stability.py, 6e-2).
        self.loss_history.clear()
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
    def fit(
        self,
        on_eval: Callable[[dict[str, float]], None] | None = None,
        should_stop: Callable[[int], bool] | None = None,
        save_final: Callable[[], Path | None] | None = None,
    ) -> dict[str, float]:
        """Train until ``max_steps``; evaluate, log and checkpoint on the way; save ``out/final``.

        Hooks let a stage shape the run without rebuilding this loop: ``on_eval(metrics)`` sees every
        evaluation's metrics (the periodic ones and the final one); ``should_stop(step)``, asked after each step's
        evaluation and checkpoint, ends training early (logged as an ``early_stop`` event; the final
        evaluation and save still run); ``save_final()`` replaces :meth:`save_final` as the run's artefact
        (e.g. a LoRA adapter instead of a full checkpoint).
        """
        cfg = self.cfg
        if self.step == 0:
            self.logger.reset()  # a new run: don't mix in the metrics of an earlier run in this directory
        bar = None
        if self.dist.is_main and cfg.progress:
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
                        bar.set_postfix(self._progress_fields(m))
                    window_tokens, window_time, window_losses = 0.0, 0.0, []
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    self._evaluate_and_report(on_eval)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save()
                if should_stop is not None and self.step < cfg.max_steps and should_stop(self.step):
                    self.logger.event(self.step, "early_stop")
                    break
        finally:
            if bar is not None:
                bar.close()
        self._evaluate_and_report(on_eval)
        if self.out_dir is not None:
            self.save()
            (save_final or self.save_final)()
            if cfg.plot and self.dist.is_main and self.logger.path is not None and self.logger.path.exists():
                plot_loss_curve(self.logger.path, self.out_dir / PLOT_FILE)
        self.logger.close()
        return dict(self.last_metrics)

    @staticmethod
    def _progress_fields(m: dict[str, float]) -> dict[str, str]:
        """The progress bar's fields; each MFU labelled by its peak (measured matmul / datasheet)."""
        fields = {"loss": f"{m['loss']:.3f}", "tok_s": f"{m['tokens_per_s']:.0f}"}
        fields["mfu_measured_peak"] = f"{100 * m['mfu']:.1f}%"
        if "mfu_datasheet" in m:
            fields["mfu_datasheet_peak"] = f"{100 * m['mfu_datasheet']:.1f}%"
        return fields

    def _throughput(self, tokens: float, seconds: float, batches: list[dict]) -> dict[str, float]:
        """tokens/s and MFU against the measured matmul peak (``mfu``) and, when known, the datasheet peak
        (``mfu_datasheet``, the figure the anchors report)."""
        tps = tokens / seconds if seconds > 0 else 0.0
        out = {"tokens_per_s": tps, "mfu": 0.0}
        model_cfg = getattr(self.unwrapped, "cfg", None)
        if model_cfg is not None and batches and "input_ids" in batches[0]:
            dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32
            if self._peak is None:
                self._peak = measure_peak_tflops(self.device, dtype)
            fpt = flops_per_token(model_cfg, int(batches[0]["input_ids"].shape[1]), training=True)
            out["mfu"] = mfu(tps, fpt, self._peak, self.dist.world_size)
            sheet = self.cfg.datasheet_tflops or datasheet_peak_tflops(self.device, dtype)
            if sheet:
                out["mfu_datasheet"] = mfu(tps, fpt, sheet, self.dist.world_size)
        return out

    def _evaluate_and_report(self, on_eval: Callable[[dict[str, float]], None] | None) -> None:
        metrics = self.evaluate()
        if on_eval is not None and self.eval_fn is not None:
            on_eval(metrics)

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


def _count_tokens(batch: dict[str, Any]) -> int:
    """Tokens a micro-batch feeds the model: every ``*input_ids`` tensor (e.g. chosen + rejected for DPO)."""
    return sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, Tensor))


def _foreach_ok(tensors: list[Tensor]) -> bool:
    return not any(hasattr(t, "full_tensor") for t in tensors)  # DTensor grads: use per-tensor ops
