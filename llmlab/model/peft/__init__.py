"""Parameter-efficient fine-tuning methods over the one Transformer, saved in PEFT's format where PEFT has one.

======== ====================================== ============================== ===========================
method   what trains                            where it hooks in              file
======== ====================================== ============================== ===========================
lora     low-rank ``B A`` on linear layers      ``LoRALinear`` (model/lora.py) PEFT ``LORA``
dora     LoRA + per-row magnitude               ``DoRALinear`` (dora.py)       PEFT ``LORA``, use_dora
ia3      scaling vectors on k, v, FFN input     ``IA3Linear`` (ia3.py)         PEFT ``IA3``
prefix   per-layer key/value prefixes           ``model.kv_prefix`` (prefix.py) PEFT ``PREFIX_TUNING``
prompt   soft prompt embeddings                 ``model.kv_prefix`` (prompt.py) PEFT ``PROMPT_TUNING``
adapter  Houlsby bottleneck after attn / FFN    ``BottleneckLinear``           llmlab ``BOTTLENECK``
======== ====================================== ============================== ===========================

:func:`apply_peft` wraps a model for training (everything else frozen), :func:`save_peft` writes
``adapter_config.json`` + ``adapter_model.safetensors`` for whichever method the model carries, and
:func:`load_adapter` (what ``llmlab.load(base, adapter=DIR)`` calls) dispatches on the file's ``peft_type``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from llmlab.errors import CheckpointError, ConfigError
from llmlab.model.lora import LoRAConfig, apply_adapter, apply_lora, lora_layers, save_adapter
from llmlab.model.peft.bottleneck import (
    BottleneckConfig,
    apply_bottleneck,
    bottleneck_layers,
    load_bottleneck,
    save_bottleneck,
)
from llmlab.model.peft.common import read_adapter_json
from llmlab.model.peft.dora import DoRALinear, apply_dora
from llmlab.model.peft.ia3 import IA3Config, apply_ia3, ia3_layers, load_ia3, save_ia3
from llmlab.model.peft.prefix import KVPrefix, PrefixConfig, apply_prefix, load_prefix, save_prefix
from llmlab.model.peft.prompt import PromptConfig, SoftPrompt, apply_prompt, load_prompt, save_prompt

METHODS = ("lora", "dora", "ia3", "prefix", "prompt", "adapter")

__all__ = [
    "METHODS",
    "BottleneckConfig",
    "IA3Config",
    "LoRAConfig",
    "PrefixConfig",
    "PromptConfig",
    "apply_peft",
    "load_adapter",
    "peft_method",
    "save_peft",
]


def apply_peft(model: nn.Module, method: str, cfg: Any) -> None:
    """Wrap ``model`` with ``method`` configured by ``cfg`` (the method's config dataclass); only the
    method's parameters train afterwards."""
    if method == "lora":
        apply_lora(model, cfg)
    elif method == "dora":
        apply_dora(model, cfg)
    elif method == "ia3":
        apply_ia3(model, cfg)
    elif method == "prefix":
        apply_prefix(model, cfg)
    elif method == "prompt":
        apply_prompt(model, cfg)
    elif method == "adapter":
        apply_bottleneck(model, cfg)
    else:
        raise ConfigError(f"unknown PEFT method {method!r} (one of {', '.join(METHODS)})")


def peft_method(model: nn.Module) -> str | None:
    """Which method ``model`` carries (None: none)."""
    prefix = getattr(model, "kv_prefix", None)
    if isinstance(prefix, KVPrefix):
        return "prefix"
    if isinstance(prefix, SoftPrompt):
        return "prompt"
    layers = list(lora_layers(model))
    if layers:
        return "dora" if isinstance(layers[0][1], DoRALinear) else "lora"
    if ia3_layers(model):
        return "ia3"
    if bottleneck_layers(model):
        return "adapter"
    return None


def save_peft(model: nn.Module, directory: str | Path, base_model: str | None = None) -> Path:
    """Write the model's adapter (whichever method) into ``directory``."""
    method = peft_method(model)
    if method is None:
        raise ConfigError("model carries no PEFT adapter to save")
    if method in ("lora", "dora"):
        return save_adapter(model, directory, base_model=base_model)
    save = {"ia3": save_ia3, "prefix": save_prefix, "prompt": save_prompt, "adapter": save_bottleneck}[method]
    return save(model, directory, base_model)


def load_adapter(model: nn.Module, directory: str | Path, trainable: bool = False) -> nn.Module:
    """Apply the adapter saved in ``directory`` (llmlab- or PEFT-written) to ``model``; returns ``model``."""
    data = read_adapter_json(directory)
    kind = data.get("peft_type", "LORA")
    if kind == "LORA":
        return apply_adapter(model, directory, trainable, DoRALinear if data.get("use_dora") else None)
    loaders = {
        "IA3": load_ia3,
        "PREFIX_TUNING": load_prefix,
        "PROMPT_TUNING": load_prompt,
        "BOTTLENECK": load_bottleneck,
    }
    if kind not in loaders:
        raise CheckpointError(
            f"{Path(directory) / 'adapter_config.json'}: peft_type {kind!r} is not supported "
            f"(LORA, IA3, PREFIX_TUNING, PROMPT_TUNING, BOTTLENECK)"
        )
    return loaders[kind](model, directory, data, trainable)
