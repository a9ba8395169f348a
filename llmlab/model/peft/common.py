"""Pieces every parameter-efficient method shares: wrapping named linear layers, freezing, and the adapter
directory (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's file layout) read and written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from llmlab.errors import CheckpointError, ConfigError
from llmlab.model.checkpoint import atomic_write_file, load_state_dict
from llmlab.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SHORT_TARGETS

# Module leaves each method may wrap: all of them are plain linear layers of the llama layout.
LINEAR_LEAVES = tuple(SHORT_TARGETS.values())
ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj")


def leaf_names(targets: Sequence[str], method: str, allowed: Sequence[str] = LINEAR_LEAVES) -> list[str]:
    """Short names (``k`` -> ``k_proj``) expanded and checked against what ``method`` can wrap."""
    out: list[str] = []
    for t in targets:
        t = t.strip()
        leaf = SHORT_TARGETS.get(t, t)
        if leaf not in allowed:
            raise ConfigError(
                f"PEFT method '{method}' cannot wrap module '{t}' (it wraps: {', '.join(allowed)})"
            )
        if leaf not in out:
            out.append(leaf)
    if not out:
        raise ConfigError(f"PEFT method '{method}' needs at least one target module")
    return out


def wrap_linears(
    model: nn.Module, leaves: Sequence[str], method: str, make: Callable[[str, nn.Module], nn.Module]
) -> list[str]:
    """Replace ``layers.N.self_attn.<leaf>`` / ``layers.N.mlp.<leaf>`` of every block by ``make(name, module)``.

    Each requested leaf must be a plain linear layer in every block: a mixture-of-experts FFN (experts kept
    as stacked tensors, no ``down_proj``), a non-gated FFN asked for ``gate_proj`` or an already wrapped
    layer cannot carry a per-layer vector or bottleneck, and one clear error names the module.
    """
    wrapped = []
    for i, block in enumerate(model.layers):
        for leaf in leaves:
            parent_name = "self_attn" if leaf in ATTENTION_LEAVES else "mlp"
            parent = getattr(block, parent_name)
            module = getattr(parent, leaf, None)
            name = f"layers.{i}.{parent_name}.{leaf}"
            if type(module) is not nn.Linear:
                what = type(module).__name__ if module is not None else f"{type(parent).__name__} has none"
                raise ConfigError(
                    f"PEFT method '{method}' cannot wrap module '{name}' ({what}, not a linear layer)"
                )
            setattr(parent, leaf, make(name, module))
            wrapped.append(name)
    return wrapped


def freeze_except(model: nn.Module, marker: str) -> None:
    """Only parameters whose name contains ``marker`` train."""
    for name, p in model.named_parameters():
        p.requires_grad_(marker in name)


def write_adapter(directory: str | Path, config: dict[str, Any], state: dict[str, Tensor]) -> Path:
    """Weights then config, each written atomically, beside whatever else the run directory holds."""
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_file(
        directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})
    )
    text = json.dumps(config, indent=2)
    atomic_write_file(directory / ADAPTER_CONFIG, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return directory


def read_adapter_json(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not an adapter directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_adapter_weights(directory: str | Path) -> tuple[Path, dict[str, Tensor]]:
    path = Path(directory) / ADAPTER_WEIGHTS
    return path, load_state_dict(path)


def config_int(data: dict[str, Any], key: str, path: Path) -> int:
    try:
        return int(data[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: key '{key}' missing or not an integer") from exc


def take_tensor(state: dict[str, Tensor], key: str, shape: tuple[int, ...], path: Path) -> Tensor:
    """``state[key]`` checked against the shape the base model needs."""
    if key not in state:
        raise CheckpointError(f"{path}: missing tensor '{key}'")
    t = state[key]
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(
            f"{path}: tensor '{key}' has shape {tuple(t.shape)}, the base model needs {tuple(shape)} "
            "(adapter made for a different base?)"
        )
    return t
