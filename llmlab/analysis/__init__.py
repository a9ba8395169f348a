"""Stage analysis: which parameters a stage moved, how attention and outputs changed (``llmlab analyze``).

:mod:`.params` (relative update norms per group and layer, update spectra, LoRA effective rank),
:mod:`.attention` (per-head entropy, keyword attention mass, JS divergence, output KL on keyword probes through
the model's explicit ``return_attention`` forward) and :mod:`.analyze` (the driver: ``analysis.json`` + figures).
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

_LAZY = {"analyze": "llmlab.analysis.analyze", "param_delta": "llmlab.analysis.params"}

__getattr__ = lazy_exports("llmlab.analysis", _LAZY)

__all__ = sorted(_LAZY)
