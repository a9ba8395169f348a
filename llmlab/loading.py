"""``llmlab.load(path)``: one call for every checkpoint kind llmlab reads.

Dispatch on what is at ``path``:

- a ``.gguf`` file -> :func:`llmlab.interop.gguf.load_gguf`;
- a directory whose ``config.json`` has ``"llmlab_format"`` -> llmlab's own checkpoint
  (or, when it also has ``"quantization"``, ``llmlab.quant.load_quantized``);
- a directory whose ``config.json`` has ``"model_type"`` -> :func:`llmlab.interop.hf.load_hf`.

Anything else raises :class:`~llmlab.errors.CheckpointError` naming the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmlab.errors import CheckpointError, ConfigError

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
    """Load a model and its tokenizer from an llmlab checkpoint dir, an HF model dir or a ``.gguf`` file.

    Returns ``(model, tokenizer)``; ``tokenizer`` is None when the checkpoint carries none. The model is in
    eval mode, on ``device``, in ``dtype`` (None: fp32, except quantized checkpoints, which keep their own
    layout). ``adapter`` is a LoRA adapter directory applied on top.
    """
    path = Path(path)
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
        # --- hook: LoRA adapters (owned by llmlab/model/lora.py) -------------------------------------
        try:
            from llmlab.model.lora import apply_adapter
        except ImportError as exc:
            raise CheckpointError(
                f"{adapter}: LoRA adapters need llmlab.model.lora, which is not available"
            ) from exc
        if not Path(adapter).exists():
            raise CheckpointError(f"{adapter}: adapter not found")
        result = apply_adapter(model, adapter)
        model = result if result is not None else model
    return model.eval(), tokenizer
