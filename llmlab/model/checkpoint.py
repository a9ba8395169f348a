"""llmlab's own checkpoint directory: ``config.json`` + ``model.safetensors`` + ``tokenizer.json``.

Weights are safetensors only (no pickle). Every write goes to a temporary sibling and is renamed into place,
so a crash mid-write never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmlab.errors import CheckpointError
from llmlab.model.config import ModelConfig
from llmlab.model.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_KEY = "llmlab_format"
FORMAT_VERSION = 1
# Set in the config.json of a trainer resume checkpoint that holds only the trainable tensors of a run with
# frozen weights (LoRA, QLoRA, freeze_layers): see :mod:`llmlab.train.state`. Not a loadable model.
TRAINABLE_ONLY_KEY = "trainable_only"


def is_llmlab_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return FORMAT_KEY in json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def atomic_write_dir(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then swap ``tmp_dir`` into ``directory`` (replacing it only on success)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir(tmp)
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def atomic_write_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def write_checkpoint_files(
    directory: Path,
    model: Transformer,
    tokenizer: Any | None = None,
    extra_config: dict[str, Any] | None = None,
    weights_file: str = WEIGHTS_FILE,
) -> None:
    """Write model/tokenizer files into an existing directory (non-atomic; see :func:`save_checkpoint`)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / weights_file), metadata={"format": "pt"})
    config = {FORMAT_KEY: FORMAT_VERSION, "model": model.cfg.to_dict(), **(extra_config or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(directory)


def save_checkpoint(
    directory: str | Path,
    model: Transformer,
    tokenizer: Any | None = None,
    extra_config: dict[str, Any] | None = None,
    extra_files: Callable[[Path], None] | None = None,
    weights_file: str = WEIGHTS_FILE,
) -> Path:
    """Atomically write an llmlab checkpoint directory (``weights_file`` names the tensors file)."""

    def write(tmp: Path) -> None:
        write_checkpoint_files(tmp, model, tokenizer, extra_config, weights_file)
        if extra_files is not None:
            extra_files(tmp)

    return atomic_write_dir(directory, write)


def read_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    cfg_file = directory / CONFIG_FILE
    if not directory.exists():
        raise CheckpointError(f"{directory}: checkpoint not found")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not an llmlab checkpoint)")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: corrupt JSON ({exc})") from exc


def load_state_dict(file: str | Path) -> dict[str, torch.Tensor]:
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: weights file missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from exc


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the first bad tensor."""
    check_state(model, state, source)
    model.load_state_dict(state, strict=True)


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Same names and shapes as the model's own state, else a CheckpointError naming the first bad tensor."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise CheckpointError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} unexpected)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{source}: tensor '{k}' has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
            )


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Any]:
    """Load an llmlab checkpoint directory -> ``(model, tokenizer or None)``."""
    from llmlab.tokenizer import TOKENIZER_FILE, Tokenizer

    directory = Path(directory)
    config = read_config(directory)
    if FORMAT_KEY not in config:
        raise CheckpointError(f"{directory / CONFIG_FILE}: not an llmlab checkpoint (no '{FORMAT_KEY}' key)")
    if config.get(TRAINABLE_ONLY_KEY):
        raise CheckpointError(
            f"{directory}: a resume checkpoint holding only the trainable tensors of a run with frozen "
            "weights (LoRA/QLoRA/frozen layers), not a whole model: resume that run (--resume), or load "
            "its final output (final/ or the adapter)"
        )
    cfg = ModelConfig.from_dict(config["model"], source=str(directory / CONFIG_FILE))
    with torch.device("meta"):
        model = Transformer(cfg)
    state = load_state_dict(directory / WEIGHTS_FILE)
    model = model.to_empty(device=device)
    load_into(model, state, str(directory / WEIGHTS_FILE))
    # Non-persistent buffers (RoPE tables, ALiBi slopes) were created on meta: rebuild them.
    _rebuild_buffers(model)
    model.eval()
    tokenizer = Tokenizer.from_file(directory) if (directory / TOKENIZER_FILE).is_file() else None
    return model, tokenizer


def _rebuild_buffers(model: Transformer) -> None:
    from llmlab.model.rope import RotaryEmbedding
    from llmlab.model.transformer import alibi_slopes, model_causal_bias

    device = model.embed_tokens.weight.device
    model.causal_bias = model_causal_bias(model.cfg).to(device)
    if model.rotary is not None:
        model.rotary = RotaryEmbedding(model.cfg).to(device)
    if model.cfg.position == "alibi":
        model.alibi = alibi_slopes(model.cfg.n_heads).to(device)
