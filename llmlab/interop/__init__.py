"""Checkpoint interop: Hugging Face directories and GGUF files, both ways.

- :mod:`llmlab.interop.hf`: ``load_hf(dir)``, ``save_hf(dir, model, tokenizer, max_shard_size)``
  (MoE families: :mod:`llmlab.interop.hf_moe`).
- :mod:`llmlab.interop.gguf`: ``load_gguf(file)`` (F32/F16/BF16/Q8_0/Q4_0/Q4_1, llama and qwen2 archs; qwen3
  and the MoE archs through :mod:`llmlab.interop.gguf_moe`).
- :mod:`llmlab.interop.gguf_export`: ``save_gguf(file, model, tokenizer, "f16"|"q8_0"|"q4_0"|...)``.
- ``llmlab.load(path)`` (:mod:`llmlab.loading`) dispatches between them and llmlab's own checkpoints.
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

# Lazy, so that ``llmlab.interop.cli`` (imported by ``llmlab --help``) does not pull in torch.
_LAZY = {
    "build_model": "llmlab.interop.build",
    "check_state": "llmlab.interop.build",
    "load_hf": "llmlab.interop.hf",
    "save_hf": "llmlab.interop.hf",
    "load_gguf": "llmlab.interop.gguf",
    "save_gguf": "llmlab.interop.gguf_export",
}


__getattr__ = lazy_exports("llmlab.interop", _LAZY)


__all__ = list(_LAZY)
