"""Knowledge distillation's library: draft students copied from a teacher (:mod:`.student`) and their data
(:mod:`.data`). The run itself, ``llmlab distill``, is :mod:`llmlab.recipes.distill`.

The main use is a *draft model* for speculative decoding: a shallow copy of the teacher, sharing its
tokenizer, trained to predict what the teacher would. Exports load lazily, so ``llmlab.distill.cli`` (and
``llmlab --help``) do not import torch.
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

_LAZY = {
    "heldout_prompts": "llmlab.distill.data",
    "spaced_layers": "llmlab.distill.student",
    "speculative_check": "llmlab.distill.student",
    "student_from_teacher": "llmlab.distill.student",
}

__getattr__ = lazy_exports("llmlab.distill", _LAZY)

__all__ = sorted(_LAZY)
