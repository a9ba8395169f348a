"""Supervised fine-tuning: chat templates and assistant-only masks (:mod:`.chat`), data loading and batching
(:mod:`.datasets`). The run itself, ``llmlab sft``, is :mod:`llmlab.recipes.sft`.

Exports load lazily, so ``llmlab.sft.cli`` (and ``llmlab --help``) do not import torch.
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

_LAZY = {
    "CHATML_TEMPLATE": "llmlab.sft.chat",
    "TokenizedChat": "llmlab.sft.chat",
    "prompt_ids": "llmlab.sft.chat",
    "render": "llmlab.sft.chat",
    "tokenize_chat": "llmlab.sft.chat",
    "SFTBatchSource": "llmlab.sft.datasets",
    "encode_conversations": "llmlab.sft.datasets",
    "load_conversations": "llmlab.sft.datasets",
}

__getattr__ = lazy_exports("llmlab.sft", _LAZY)

__all__ = sorted(_LAZY)
