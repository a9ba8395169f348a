"""IA³ (Liu et al. 2022, "Few-shot PEFT is better and cheaper than in-context learning"), in PEFT's format.

Learned vectors rescale the keys, the values and the FFN's inner activations:

- on a non-feedforward target (``k_proj``, ``v_proj``) the *output* is scaled: ``y = (W x + b) * l_out``
  with ``l_out`` of shape ``[out, 1]``;
- on a feedforward target (``down_proj``) the *input* is scaled: ``y = W (x * l_in) + b`` with ``l_in`` of
  shape ``[1, in]``; ``x`` there is the FFN's activation ``act(gate) * up``, so this is IA³'s ``l_ff``.

Every vector starts at ones, so a fresh model is the base exactly. Trainable parameters per layer, with the
default targets: ``2 * kv_heads * head_dim + ffn_dim``. Saved as PEFT saves an ``IA3Config`` adapter
(``...k_proj.ia3_l`` tensors; ``target_modules`` and ``feedforward_modules`` in ``adapter_config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from llmlab.errors import CheckpointError, ConfigError
from llmlab.model.lora import peft_key
from llmlab.model.peft.common import (
    freeze_except,
    leaf_names,
    read_adapter_weights,
    take_tensor,
    wrap_linears,
    write_adapter,
)


@dataclass
class IA3Config:
    targets: list[str] = field(default_factory=lambda: ["k", "v", "down"])
    feedforward: list[str] = field(default_factory=lambda: ["down"])  # scaled on the input (l_ff)

    def leaves(self) -> tuple[list[str], list[str]]:
        targets = leaf_names(self.targets, "ia3")
        ff = leaf_names(self.feedforward, "ia3") if self.feedforward else []
        stray = [f for f in ff if f not in targets]
        if stray:
            raise ConfigError(
                f"config key 'ia3.feedforward': {stray[0]} is not among 'ia3.targets' {targets}"
            )
        return targets, ff


class IA3Linear(nn.Module):
    """A linear layer whose output (or, ``feedforward``, input) is rescaled by the learned ``ia3_l``."""

    def __init__(self, base_layer: nn.Linear, feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        self.feedforward = feedforward
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        w = base_layer.weight
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=w.dtype))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer(x * scale.to(x.dtype))
        out = self.base_layer(x)
        return out * scale.to(out.dtype)

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}"


def apply_ia3(model: nn.Module, cfg: IA3Config) -> list[str]:
    """Wrap the targets with IA³ vectors (ones) and freeze everything else; returns the wrapped names."""
    targets, ff = cfg.leaves()
    wrapped = wrap_linears(model, targets, "ia3", lambda name, m: IA3Linear(m, name.rsplit(".", 1)[-1] in ff))
    freeze_except(model, ".ia3_l")
    return wrapped


def ia3_layers(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]


def save_ia3(model: nn.Module, directory: str | Path, base_model: str | None) -> Path:
    layers = ia3_layers(model)
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    ff = sorted({n.rsplit(".", 1)[-1] for n, m in layers if m.feedforward})
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": targets,
        "feedforward_modules": ff,
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "exclude_modules": None,
        "revision": None,
    }
    state = {f"{peft_key(n)}.ia3_l": m.ia3_l for n, m in layers}
    return write_adapter(directory, config, state)


def load_ia3(model: nn.Module, directory: str | Path, data: dict, trainable: bool) -> nn.Module:
    directory = Path(directory)
    targets, ff = data.get("target_modules"), data.get("feedforward_modules") or []
    if not isinstance(targets, list) or not isinstance(ff, list):
        raise CheckpointError(
            f"{directory}/adapter_config.json: 'target_modules'/'feedforward_modules' must be lists of names"
        )
    try:
        apply_ia3(model, IA3Config(targets=targets, feedforward=ff))
    except ConfigError as exc:
        raise CheckpointError(f"{directory}/adapter_config.json: {exc}") from exc
    path, state = read_adapter_weights(directory)
    layers = ia3_layers(model)
    for name, m in layers:
        t = take_tensor(state, f"{peft_key(name)}.ia3_l", tuple(m.ia3_l.shape), path)
        with torch.no_grad():
            m.ia3_l.copy_(t.to(m.ia3_l.dtype))
    extra = set(state) - {f"{peft_key(n)}.ia3_l" for n, _ in layers}
    if extra:
        raise CheckpointError(
            f"{path}: tensor '{sorted(extra)[0]}' has no matching IA³ layer in the base model"
        )
    model.requires_grad_(False)
    if trainable:
        freeze_except(model, ".ia3_l")
    return model
