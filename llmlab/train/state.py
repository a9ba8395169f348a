"""Training state beside the model in a checkpoint directory, without pickle.

``out/ckpt-0000200/`` is an ordinary llmlab checkpoint (``config.json`` + ``model.safetensors`` + tokenizer)
plus:

- ``optimizer.safetensors``: every optimizer tensor (AdamW moments and step counts), keyed
  ``state/<param name>/<key>``, gathered to full tensors so it reloads on any world size;
- ``trainer_state.json``: optimizer structure (param groups by name, non-tensor state), step, LR scale,
  loss-guard history, data-loader position, RNG states (python, numpy, torch as a byte list) and the config.

When some parameters are frozen (LoRA, QLoRA, ``freeze_layers``, ``train_modules``) the frozen base is not
saved again at every checkpoint: ``trainable.safetensors`` replaces ``model.safetensors`` and holds only the
trainable parameters, ``config.json`` says ``"trainable_only": true``, and resuming restores them onto a model
the caller has already rebuilt (base + adapters + freezing), checked tensor by tensor.

``out/latest`` holds the name of the newest complete checkpoint; it is written atomically after the
directory, so a kill at any moment leaves ``latest`` pointing at a whole checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from llmlab.errors import CheckpointError
from llmlab.model.checkpoint import atomic_write_file, load_state_dict

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
CKPT_PREFIX = "ckpt-"


def ckpt_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:07d}"


# ------------------------------------------------------------------------------------------ optimizer
def flatten_optimizer_state(optim_state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a name-keyed optimizer state dict into safetensors tensors and a JSON structure."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entry in optim_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in optim_state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        prefix, _, rest = key.partition("/")
        name, _, field = rest.rpartition("/")
        if prefix != "state" or not name:
            raise CheckpointError(f"{OPTIMIZER_FILE}: unexpected tensor '{key}'")
        state.setdefault(name, {})[field] = value
    for name, entry in structure.get("scalars", {}).items():
        state.setdefault(name, {}).update(entry)
    groups = []
    for g in structure["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ---------------------------------------------------------------------------------------- read/write
def write_training_state(directory: Path, optim_state: dict | None, trainer_state: dict[str, Any]) -> None:
    """Write ``optimizer.safetensors`` and ``trainer_state.json`` into ``directory`` (inside an atomic dir)."""
    state = dict(trainer_state)
    if optim_state is not None:
        tensors, structure = flatten_optimizer_state(optim_state)
        save_file(tensors, str(directory / OPTIMIZER_FILE), metadata={"format": "pt"})
        state["optimizer"] = structure
    (directory / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")


def read_training_state(directory: str | Path) -> tuple[dict[str, Any], dict | None]:
    """``(trainer_state, optimizer_state or None)``; a missing or corrupt file raises CheckpointError."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a training checkpoint; cannot resume from it)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt JSON ({exc})") from exc
    for key in ("step", "rng"):
        if key not in state:
            raise CheckpointError(f"{path}: missing key '{key}'")
    optim = None
    if "optimizer" in state:
        optim = unflatten_optimizer_state(load_state_dict(directory / OPTIMIZER_FILE), state.pop("optimizer"))
    return state, optim


def write_latest(out_dir: Path, name: str) -> None:
    atomic_write_file(out_dir / LATEST_FILE, lambda tmp: tmp.write_text(name + "\n", encoding="utf-8"))


def find_latest(out_dir: str | Path) -> Path | None:
    """The checkpoint ``out/latest`` points to, or None when the run has none yet."""
    out_dir = Path(out_dir)
    pointer = out_dir / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = out_dir / name
    if not name or not path.is_dir():
        raise CheckpointError(f"{pointer}: points to '{name}', which does not exist")
    return path


def list_checkpoints(out_dir: Path) -> list[Path]:
    found = []
    for p in out_dir.glob(f"{CKPT_PREFIX}*"):
        suffix = p.name[len(CKPT_PREFIX) :]
        if p.is_dir() and suffix.isdigit():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX) :]))


def prune_checkpoints(out_dir: Path, keep_last: int, protect: Path | None = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (0 keeps all); never the one ``latest`` names."""
    if keep_last <= 0:
        return
    ckpts = list_checkpoints(out_dir)
    for p in ckpts[:-keep_last]:
        if protect is not None and p.resolve() == protect.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
