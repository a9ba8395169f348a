"""Bottleneck adapters (Houlsby et al. 2019), saved in llmlab's own documented format (PEFT has none).

After the attention sublayer and/or the FFN (on the output of ``o_proj`` / ``down_proj``, before the residual
add) a small residual MLP is inserted: ``h + W_up act(W_down h + b_down) + b_up`` with ``W_down [m, d]``,
``W_up [d, m]``. ``W_up`` and ``b_up`` start at zero, so a fresh adapter is the identity. Trainable
parameters per adapter: ``2 d m + m + d`` (``m`` = ``size``); with ``where = attn,ffn`` there are two per layer.

**File format** (``format: llmlab-bottleneck-v1``), the same two files as a PEFT adapter so run directories
and ``llmlab.load(base, adapter=DIR)`` treat it alike:

- ``adapter_config.json``: ``{"peft_type": "BOTTLENECK", "format": "llmlab-bottleneck-v1",
  "bottleneck_size": m, "target_modules": ["o_proj", "down_proj"], "activation": "relu",
  "base_model_name_or_path": ...}``;
- ``adapter_model.safetensors``: for each wrapped module, with PEFT's key prefix,
  ``base_model.model.model.layers.N.self_attn.o_proj.adapter_down.weight`` ``[m, d]``,
  ``....adapter_down.bias`` ``[m]``, ``....adapter_up.weight`` ``[d, m]``, ``....adapter_up.bias`` ``[d]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from llmlab.errors import CheckpointError, ConfigError
from llmlab.model.lora import peft_key
from llmlab.model.peft.common import (
    config_int,
    freeze_except,
    read_adapter_weights,
    take_tensor,
    wrap_linears,
    write_adapter,
)
from llmlab.model.transformer import activation_fn

FORMAT = "llmlab-bottleneck-v1"
PLACES = {"attn": "o_proj", "ffn": "down_proj"}
ACTIVATIONS = ("relu", "gelu", "silu", "gelu_tanh")


@dataclass
class BottleneckConfig:
    size: int = 16  # bottleneck width m
    where: list[str] = field(default_factory=lambda: ["attn", "ffn"])
    activation: str = "relu"

    def leaves(self) -> list[str]:
        if self.size <= 0:
            raise ConfigError(f"config key 'adapter.size' must be positive, got {self.size}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"config key 'adapter.activation' must be one of {list(ACTIVATIONS)}")
        bad = [w for w in self.where if w not in PLACES]
        if bad or not self.where:
            raise ConfigError(
                f"PEFT method 'adapter' cannot wrap module {bad[0] if bad else '(none)'!r} "
                f"(config key 'adapter.where': attn and/or ffn)"
            )
        return [PLACES[w] for w in self.where]


class BottleneckLinear(nn.Module):
    """``y + up(act(down(y)))`` with ``y = base_layer(x)``."""

    def __init__(self, base_layer: nn.Linear, size: int, activation: str):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.activation = activation
        self.act = activation_fn(activation)
        w = base_layer.weight
        factory = {"device": w.device, "dtype": w.dtype}
        self.adapter_down = nn.Linear(self.out_features, size, **factory)
        self.adapter_up = nn.Linear(size, self.out_features, **factory)
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # the identity at init
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        return y + self.adapter_up(self.act(self.adapter_down(y)))


def apply_bottleneck(model: nn.Module, cfg: BottleneckConfig) -> list[str]:
    leaves = cfg.leaves()
    wrapped = wrap_linears(
        model, leaves, "adapter", lambda _, m: BottleneckLinear(m, cfg.size, cfg.activation)
    )
    freeze_except(model, ".adapter_")
    return wrapped


def bottleneck_layers(model: nn.Module) -> list[tuple[str, BottleneckLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BottleneckLinear)]


def _tensors(name: str, m: BottleneckLinear) -> dict[str, Tensor]:
    key = peft_key(name)
    return {
        f"{key}.adapter_down.weight": m.adapter_down.weight,
        f"{key}.adapter_down.bias": m.adapter_down.bias,
        f"{key}.adapter_up.weight": m.adapter_up.weight,
        f"{key}.adapter_up.bias": m.adapter_up.bias,
    }


def save_bottleneck(model: nn.Module, directory: str | Path, base_model: str | None) -> Path:
    layers = bottleneck_layers(model)
    first = layers[0][1]
    config = {
        "peft_type": "BOTTLENECK",
        "format": FORMAT,
        "base_model_name_or_path": base_model,
        "bottleneck_size": first.adapter_down.out_features,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}),
        "activation": first.activation,
    }
    state: dict[str, Tensor] = {}
    for name, m in layers:
        state.update(_tensors(name, m))
    return write_adapter(directory, config, state)


def load_bottleneck(model: nn.Module, directory: str | Path, data: dict, trainable: bool) -> nn.Module:
    directory = Path(directory)
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{directory}/adapter_config.json: 'format' must be {FORMAT!r}")
    where = [w for w, leaf in PLACES.items() if leaf in (data.get("target_modules") or [])]
    cfg = BottleneckConfig(
        size=config_int(data, "bottleneck_size", directory),
        where=where,
        activation=str(data.get("activation", "relu")),
    )
    try:
        apply_bottleneck(model, cfg)
    except ConfigError as exc:
        raise CheckpointError(f"{directory}/adapter_config.json: {exc}") from exc
    path, state = read_adapter_weights(directory)
    expected: set[str] = set()
    for name, m in bottleneck_layers(model):
        for key, param in _tensors(name, m).items():
            with torch.no_grad():
                param.copy_(take_tensor(state, key, tuple(param.shape), path).to(param.dtype))
            expected.add(key)
    extra = set(state) - expected
    if extra:
        raise CheckpointError(
            f"{path}: tensor '{sorted(extra)[0]}' has no matching adapter in the base model"
        )
    model.requires_grad_(False)
    if trainable:
        freeze_except(model, ".adapter_")
    return model
