"""Engine construction helpers: option checking, dtype names, RoPE-scaling overrides, model loading."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmlab.config import from_dict
from llmlab.errors import ConfigError, LLMLabError
from llmlab.infer.paged_cache import PagedKVCache
from llmlab.loading import load
from llmlab.model.config import ModelConfig, RopeScaling
from llmlab.model.rope import RotaryEmbedding


def check_options(setup: Callable[..., Any], options: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
    """Reject an unknown engine option by name (the known ones are ``setup``'s keyword parameters)."""
    known = [n for n in inspect.signature(setup).parameters if n not in ("self", "model", "tokenizer")]
    for name in options:
        if name not in known and name not in extra:
            raise LLMLabError(f"unknown LLM option {name!r} (known: {', '.join(sorted([*known, *extra]))})")


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if name not in table:
        raise LLMLabError(f"option 'dtype' must be one of {sorted(table)}, got {name!r}")
    return table[name]


def apply_rope_scaling(model: nn.Module, rope_scaling: Any) -> ModelConfig:
    """Replace the model's RoPE scaling (config and cos/sin tables) in place; returns the new config."""
    cfg = model.cfg
    if cfg.position != "rope":
        raise LLMLabError("option 'rope_scaling' needs a RoPE model")
    if isinstance(rope_scaling, dict):
        try:
            rs = from_dict(RopeScaling, dict(rope_scaling))
        except ConfigError as exc:
            raise ConfigError(f"option 'rope_scaling': {exc}") from exc
    else:
        rs = rope_scaling
    if rs.original_max_seq_len is None:
        rs = dataclasses.replace(rs, original_max_seq_len=cfg.max_seq_len)
    rs.validate()
    new_cfg = dataclasses.replace(cfg, rope_scaling=rs)
    model.cfg = new_cfg
    model.rotary = RotaryEmbedding(new_cfg).to(next(model.parameters()).device)
    return new_cfg


def load_model(path: str | Path, adapter: str | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from any format ``llmlab.load`` reads."""
    return load(path, adapter=adapter) if adapter else load(path)


def pool_blocks(
    cfg: ModelConfig,
    dtype: torch.dtype,
    block_size: int,
    kv_cache_mb: float,
    max_batch_size: int,
    max_model_len: int | None,
    attention_sinks: tuple[int, int] | None,
    prefill_chunk: int,
) -> int:
    """Default KV pool size: room for ``max_batch_size`` sequences of the longest length a sequence can hold
    (the context, the sink window, or the sliding window plus a prefill chunk), capped by ``kv_cache_mb``."""
    per_block = PagedKVCache.bytes_per_token(cfg, dtype) * block_size
    want_len = max_model_len or (sum(attention_sinks or (0, 0)) + 2 * block_size)
    if attention_sinks is None and cfg.sliding_window is not None:  # the cache frees the rest
        want_len = min(want_len, cfg.sliding_window + prefill_chunk + 2 * block_size)
    wanted = max_batch_size * -(-want_len // block_size) + 1
    return max(1, min(wanted, int(kv_cache_mb * 2**20) // per_block))
