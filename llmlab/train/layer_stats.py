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
"""

from __future__ import annotations

import statistics
from collections import deque

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
