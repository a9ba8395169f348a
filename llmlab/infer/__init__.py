"""Inference: the generation engine (continuous batching over a paged KV cache), sampling, speculative
decoding, long-context options and the ``generate`` / ``chat`` commands.

Exports load lazily, so ``llmlab.infer.cli`` (and ``llmlab --help``) do not import torch.
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

_LAZY = {
    "LLM": "llmlab.infer.llm",
    "RequestOutput": "llmlab.infer.output",
    "PagedKVCache": "llmlab.infer.paged_cache",
    "SamplingParams": "llmlab.infer.sampling",
}

__getattr__ = lazy_exports("llmlab.infer", _LAZY)

__all__ = sorted(_LAZY)
