"""Inference: the generation engine (continuous batching over a paged KV cache), sampling, speculative
decoding, long-context options and the ``generate`` / ``chat`` commands."""

from llmlab.infer.engine import LLM, RequestOutput
from llmlab.infer.paged_cache import PagedKVCache
from llmlab.infer.sampling import SamplingParams

__all__ = ["LLM", "PagedKVCache", "RequestOutput", "SamplingParams"]
