"""Medusa heads for speculative decoding: the heads and their files (:mod:`.heads`), the training data of
cached hidden states (:mod:`.data`) and the loss (:mod:`.loss`). Training is ``llmlab medusa``
(:mod:`llmlab.recipes.medusa`); decoding is ``LLM(path, speculative={"method": "medusa", "heads": DIR})``.
Exports load lazily, so ``llmlab.medusa.cli`` (and ``llmlab --help``) do not import torch.
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

_LAZY = {
    "MedusaConfig": "llmlab.medusa.heads",
    "MedusaHeads": "llmlab.medusa.heads",
    "heads_for": "llmlab.medusa.heads",
    "load_heads": "llmlab.medusa.heads",
    "save_heads": "llmlab.medusa.heads",
    "medusa_loss": "llmlab.medusa.loss",
}

__getattr__ = lazy_exports("llmlab.medusa", _LAZY)

__all__ = sorted(_LAZY)
