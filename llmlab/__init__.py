"""llmlab: the whole modern LLM pipeline in one readable, tested PyTorch codebase.

Public entry points (imported lazily so ``import llmlab`` stays fast):

- ``model, tokenizer = llmlab.load(path, adapter=None)``: llmlab checkpoint dir, HF dir or ``.gguf`` file.
- ``llm = llmlab.LLM(path)``; ``llm.generate(prompts, llmlab.SamplingParams(...))``: the generation engine.
"""

from __future__ import annotations

import os
from typing import Any

# Nothing in llmlab may reach a model hub at run time.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

__version__ = "0.1.0"

_LAZY = {
    "load": ("llmlab.loading", "load"),
    "LLM": ("llmlab.infer", "LLM"),
    "SamplingParams": ("llmlab.infer", "SamplingParams"),
    "Transformer": ("llmlab.model", "Transformer"),
    "ModelConfig": ("llmlab.model", "ModelConfig"),
    "Tokenizer": ("llmlab.tokenizer", "Tokenizer"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'llmlab' has no attribute {name!r}")


__all__ = list(_LAZY)
