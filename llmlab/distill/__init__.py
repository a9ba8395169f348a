"""Knowledge distillation: a small student trained on a teacher's logits (:mod:`.recipe`, ``llmlab distill``).

The main use is a *draft model* for speculative decoding: a shallow copy of the teacher, sharing its
tokenizer, trained to predict what the teacher would. Exports load lazily, so ``llmlab.distill.cli`` (and
``llmlab --help``) do not import torch.
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

_LAZY = {
    "DISTILL_PRESETS": "llmlab.distill.recipe",
    "DistillConfig": "llmlab.distill.recipe",
    "heldout_prompts": "llmlab.distill.recipe",
    "kd_loss": "llmlab.distill.recipe",
    "run_distill": "llmlab.distill.recipe",
    "student_from_teacher": "llmlab.distill.recipe",
}

__getattr__ = lazy_exports("llmlab.distill", _LAZY)

__all__ = sorted(_LAZY)
