"""DoRA (Liu et al. 2024): LoRA with the weight split into magnitude and direction, in PEFT's format.

``W' = m * (W + s B A) / ||W + s B A||_row`` where ``||.||_row`` is the L2 norm of each output row (over the
input dimension, ``dim=1`` of an ``[out, in]`` weight) and ``m`` (``[out]``, PEFT's ``lora_magnitude_vector``)
starts at ``||W||_row``. With ``B = 0`` at init, ``W' = W``: a fresh wrap is the base. As in the paper
(section 4.3) and PEFT, the norm is treated as a constant in the backward pass (detached).

Trainable parameters per wrapped ``[out, in]`` layer: ``r * (in + out) + out``. Saved exactly as PEFT saves a
``LoraConfig(use_dora=True)`` adapter: LoRA's tensors plus ``...q_proj.lora_magnitude_vector``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.errors import ConfigError
from llmlab.model.lora import LoRAConfig, LoRALinear, apply_lora


class DoRALinear(LoRALinear):
    """``bias + (m / ||W + s B A||_row) * (W + s B A) x`` (the LoRA path reads the dropped-out ``x``)."""

    use_dora = True

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ):
        if type(base_layer) is not nn.Linear:
            raise ConfigError(
                f"DoRA needs a plain linear base layer to take row norms of, got {type(base_layer).__name__}"
            )
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().detach().clone())
        self._unmerged: Tensor | None = None

    def weight_norm(self) -> Tensor:
        """``||W + s B A||`` of each output row, in fp32."""
        w = self.base_layer.weight.float() + self.scaling * (
            self.lora_B.weight.float() @ self.lora_A.weight.float()
        )
        return torch.linalg.norm(w, dim=1)

    def reset_lora(self) -> None:
        super().reset_lora()
        if "lora_magnitude_vector" in self._parameters:  # B = 0 again: the magnitude is the base's row norm
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.weight_norm())

    def adapter_tensors(self) -> dict[str, Tensor]:
        return {**super().adapter_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def _scale(self, dtype: torch.dtype) -> Tensor:
        return (self.lora_magnitude_vector.float() / self.weight_norm().detach()).to(dtype)

    def delta_weight(self) -> Tensor:
        """``W' - W`` (for L2-SP penalties and merging)."""
        w = self.base_layer.weight
        direction = w + self.scaling * (self.lora_B.weight @ self.lora_A.weight)
        return self._scale(w.dtype)[:, None] * direction - w

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        w = self.base_layer.weight.to(x.dtype)
        scale = self._scale(x.dtype)
        dropped = self.lora_dropout(x)
        lora = F.linear(F.linear(dropped, a), b) * self.scaling
        bias = self.base_layer.bias
        if isinstance(self.lora_dropout, nn.Identity):
            out = scale * (F.linear(x, w) + lora)
            return out if bias is None else out + bias.to(out.dtype)
        # With dropout, PEFT adds (scale - 1) * W dropout(x) + scale * lora to the undropped base output.
        return self.base_layer(x) + (scale - 1) * F.linear(dropped, w) + scale * lora

    def merge(self) -> None:
        if self.merged:
            return
        with torch.no_grad():
            w = self.base_layer.weight
            self._unmerged = w.detach().clone()
            w += self.delta_weight().to(w.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        assert self._unmerged is not None
        with torch.no_grad():
            self.base_layer.weight.copy_(self._unmerged)
        self._unmerged = None
        self.merged = False


def apply_dora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap ``cfg.targets`` with DoRA (``cfg.use_dora`` is set); only A, B and the magnitudes train."""
    cfg.use_dora = True
    return apply_lora(model, cfg, DoRALinear)
