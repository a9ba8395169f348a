"""Per-layer activation and gradient norms, so a loss spike can be traced to the layer where it starts.

``train.log_layer_norms=true`` makes the Trainer attach a :class:`LayerStats` to the model. Every optimizer
step then adds to its metrics, for each Transformer block ``i``:

- ``layer{i}_act_rms``: the RMS of the block's output (the residual stream after it), from a forward hook,
  averaged over the step's micro-batches;
- ``layer{i}_grad_norm``: the L2 norm of the gradient of the block's parameters, on the same scale as the
  global ``grad_norm`` (before clipping);

plus ``embed_grad_norm``. When the spike guard skips a step, its ``skip_step`` event names ``layer``: the
block whose gradient norm grew most over its running median (:meth:`LayerStats.culprit`).
Off by default: the hooks cost a reduction per block per micro-batch and one host sync per step.

After a run, :func:`find_spikes` reads the logged losses and :func:`trace_spike` the logged per-layer norms
(``metrics.jsonl`` train rows) to say where each spike started, by the same rule.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.train.distributed import unwrap


class LayerStats:
    """Forward hooks on each block of an llmlab Transformer plus per-block gradient norms (see module doc)."""

    def __init__(self, model: nn.Module, history: int = 50):
        inner = unwrap(model)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise TypeError(f"log_layer_norms needs a model with .layers blocks, got {type(inner).__name__}")
        self.blocks: list[tuple[str, nn.Module]] = [(f"layer{i}", block) for i, block in enumerate(layers)]
        self.embed = getattr(inner, "embed_tokens", None)
        self._act_sums: dict[str, Tensor] = {}
        self._act_counts: dict[str, int] = {}
        self._history: dict[str, deque[float]] = {name: deque(maxlen=history) for name, _ in self.blocks}
        self._last_grad: dict[str, float] = {}
        self._handles = [block.register_forward_hook(self._hook(name)) for name, block in self.blocks]

    def _hook(self, name: str):
        def record(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            if not torch.is_grad_enabled():  # evaluation passes are not part of the training step
                return
            rms = output.detach().float().square().mean().sqrt()
            self._act_sums[name] = self._act_sums.get(name, 0.0) + rms
            self._act_counts[name] = self._act_counts.get(name, 0) + 1

        return record

    def collect(self, grad_scale: float = 1.0) -> dict[str, float]:
        """This step's per-layer metrics (gradients must be populated); resets the activation sums.

        ``grad_scale`` turns the accumulated gradients into the step's mean gradient (the Trainer's
        ``world_size / total weight``), so the norms compare with ``grad_norm``.
        """
        names, values = [], []
        for name, _ in self.blocks:
            if name in self._act_sums:
                names.append(f"{name}_act_rms")
                values.append(torch.as_tensor(self._act_sums[name]) / self._act_counts[name])
        modules = [(name, block) for name, block in self.blocks]
        if self.embed is not None:
            modules.append(("embed", self.embed))
        for name, module in modules:
            grads = [_local(p.grad).float() for p in module.parameters() if p.grad is not None]
            if grads:
                names.append(f"{name}_grad_norm")
                values.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) * grad_scale)
        self._act_sums.clear()
        self._act_counts.clear()
        if not values:
            return {}
        flat = torch.stack([v.to(values[0].device) for v in values]).tolist()  # one host sync
        out = dict(zip(names, flat))
        self._last_grad = {
            name: out[f"{name}_grad_norm"] for name, _ in self.blocks if f"{name}_grad_norm" in out
        }
        return out

    def commit(self) -> None:
        """Add this step's gradient norms to the running history (called for steps the guard accepted)."""
        for name, value in self._last_grad.items():
            self._history[name].append(value)

    def culprit(self) -> str | None:
        """The block whose gradient norm this step is largest relative to its median over recent good steps
        (the first layer to blow up stands out most), or None without history."""
        best, best_ratio = None, 0.0
        for name, value in self._last_grad.items():
            past = self._history[name]
            if not past:
                continue
            ratio = value / max(statistics.median(past), 1e-12)
            if ratio > best_ratio:
                best, best_ratio = name, ratio
        return best

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2: per-rank norms, good enough to locate a spike), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def find_spikes(
    losses: Sequence[float], ratio: float = 1.3, window: int = 20, min_history: int = 5
) -> list[int]:
    """Indices where a loss spike starts: ``loss[t] > ratio * median(loss[t - window : t])`` (finite values,
    at least ``min_history`` of them) or a non-finite loss. Consecutive spiking steps count once."""
    starts, inside = [], False
    for t in range(min_history, len(losses)):
        past = [x for x in losses[max(0, t - window) : t] if math.isfinite(x)]
        bad = not math.isfinite(losses[t]) or (
            len(past) >= min_history and losses[t] > ratio * statistics.median(past)
        )
        if bad and not inside:
            starts.append(t)
        inside = bad
    return starts


def _jump(rows: Sequence[dict[str, Any]], t: int, key: str, window: int) -> float | None:
    past = [r[key] for r in rows[max(0, t - window) : t] if math.isfinite(r.get(key, math.nan))]
    now = rows[t].get(key)
    if not past or now is None or not math.isfinite(now):
        return None
    return now / max(statistics.median(past), 1e-12)


def trace_spike(rows: Sequence[dict[str, Any]], t: int, window: int = 20) -> dict[str, Any]:
    """Which block a spike at train row ``t`` started in, from logged ``layer{i}_grad_norm`` / ``_act_rms``.

    Each metric's jump is its value at ``t`` over its median across the previous ``window`` rows. ``layer``
    is the block whose gradient norm jumped most (as :meth:`LayerStats.culprit`); ``act_layer`` the block
    whose output RMS jumped most. They can disagree: when the residual stream itself blows up, the
    RMSNorms make the gradients *shrink* as activations grow, and the activations are the better witness.
    Returns ``{"layer", "act_layer", "grad_norm_jump": {block: x}, "act_rms_jump": {block: x},
    "embed_grad_norm_jump"}``.
    """
    blocks = sorted(
        {k[: -len("_grad_norm")] for k in rows[t] if k.startswith("layer") and k.endswith("_grad_norm")},
        key=lambda name: int(name[len("layer") :]),
    )
    grad = {b: _jump(rows, t, f"{b}_grad_norm", window) for b in blocks}
    act = {b: _jump(rows, t, f"{b}_act_rms", window) for b in blocks}
    grad = {b: v for b, v in grad.items() if v is not None}
    act = {b: v for b, v in act.items() if v is not None}
    return {
        "layer": max(grad, key=grad.__getitem__) if grad else None,
        "act_layer": max(act, key=act.__getitem__) if act else None,
        "grad_norm_jump": grad,
        "act_rms_jump": act,
        "embed_grad_norm_jump": _jump(rows, t, "embed_grad_norm", window),
    }
