"""Evaluation: perplexity / bits per byte (``evaluate_perplexity``); other benchmarks add modules here.

Exports are lazy so ``llmlab.eval.cli`` (imported by ``llmlab --help``) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "evaluate_perplexity": "llmlab.eval.perplexity",
    "window_plan": "llmlab.eval.perplexity",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmlab.eval' has no attribute {name!r}")


__all__ = list(_LAZY)
