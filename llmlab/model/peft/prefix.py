"""Prefix tuning (Li & Liang 2021): learned keys and values in front of every sequence, in PEFT's format.

Each layer gets ``P`` trainable key/value vectors per KV head. They occupy positions ``0..P-1`` of every
sequence: the real tokens start at position ``P`` (RoPE rotates them there), every query may attend to the
whole prefix, and the prefix keys are used as given (not rotated) -- exactly what PEFT does when it hands
the prefix to a transformers Llama as ``past_key_values``.

The prefix goes through the model's one attention path: ``Transformer.forward`` wraps whatever cache it got
(none, the contiguous :class:`~llmlab.model.kv_cache.KVCache`, the engine's paged cache) in a
:class:`PrefixedCache`, which shifts query positions by ``P``, adds ``P`` always-visible key columns to the
mask and prepends the prefix to the keys/values the cache returns. The prefix is stored once in the model
and shared by all sequences, so the engine's block accounting, prefix caching and speculative rollback see
only real tokens.

Parameters: ``prompt_embeddings [P, L * 2 * kv_dim]`` (``kv_dim = kv_heads * head_dim``; per virtual token
the layers' keys and values in the order k0, v0, k1, v1, ...), ``P * L * 2 * kv_dim`` trainable; or, with
``projection`` (the paper's reparameterization), an embedding ``[P, kv_dim]`` fed through
``Linear(kv_dim, h) - tanh - Linear(h, L * 2 * kv_dim)``: ``P kv_dim + kv_dim h + h + h L 2 kv_dim + L 2 kv_dim``
trainable. Either way the adapter file holds the projected prefix (PEFT saves it the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.errors import CheckpointError, ConfigError
from llmlab.model.config import ModelConfig
from llmlab.model.kv_cache import KVCache
from llmlab.model.peft.common import config_int, read_adapter_weights, take_tensor, write_adapter
from llmlab.model.transformer import AttnMeta


@dataclass
class PrefixConfig:
    tokens: int = 16  # virtual tokens P
    projection: bool = False  # reparameterize through an MLP (the paper's trick for stable training)
    hidden: int = 0  # the MLP's width (0: kv_dim, PEFT's default)
    init: str = "vocab"  # vocab: keys/values of random vocabulary tokens; random: N(0, 1) (PEFT's default)


def check_prefix_fits(cfg: ModelConfig, tokens: int, method: str) -> None:
    """A prefix needs RoPE (the llama layout PEFT's format describes) and room for real tokens after it."""
    if tokens <= 0:
        raise ConfigError(f"config key '{method}.tokens' must be positive, got {tokens}")
    if cfg.position != "rope":
        raise ConfigError(
            f"PEFT method '{method}' cannot wrap this model: it needs RoPE positions (position={cfg.position!r})"
        )
    if tokens >= cfg.max_seq_len:
        raise ConfigError(
            f"config key '{method}.tokens': a prefix of {tokens} virtual tokens is longer than the model's "
            f"context (max_seq_len {cfg.max_seq_len}); it must leave room for real tokens"
        )


class PrefixedCache:
    """The model's KV-cache protocol with a fixed prefix before every row (see the module docstring).

    ``inner`` is the real cache or None (a plain forward: ``base_meta`` describes the tokens' attention).
    """

    def __init__(
        self, keys: list[Tensor], values: list[Tensor], inner: Any, base_meta: AttnMeta | None = None
    ):
        self.keys, self.values, self.inner, self.base_meta = keys, values, inner, base_meta
        self.num_virtual = keys[0].shape[2]

    def prepare(self, num_new: int, cfg: ModelConfig) -> AttnMeta:
        meta = self.inner.prepare(num_new, cfg) if self.inner is not None else self.base_meta
        assert meta is not None
        P = self.num_virtual
        q_pos = meta.q_pos + P
        if meta.mask is None and not meta.is_causal:  # each query sees every key: the prefix too
            return AttnMeta(q_pos=q_pos, mask=None, is_causal=False)
        B, T = q_pos.shape
        device = q_pos.device
        if meta.mask is None:  # causal over exactly the new tokens
            inner = torch.ones(T, T, dtype=torch.bool, device=device).tril().expand(B, 1, T, T)
        elif meta.mask.dtype == torch.bool:
            inner = meta.mask.expand(B, -1, -1, -1)
        else:
            raise ConfigError("prefix keys/values do not combine with additive (ALiBi) attention masks")
        prefix = torch.ones(B, 1, T, P, dtype=torch.bool, device=device)
        return AttnMeta(q_pos=q_pos, mask=torch.cat([prefix, inner], dim=-1), is_causal=False)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.inner is not None:
            k, v = self.inner.update(layer, k, v)
        B = k.shape[0]
        pk = self.keys[layer].to(k.dtype).expand(B, -1, -1, -1)
        pv = self.values[layer].to(v.dtype).expand(B, -1, -1, -1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)

    def advance(self, num_new: int) -> None:
        if self.inner is not None:
            self.inner.advance(num_new)


class KVPrefixBase(nn.Module):
    """What ``Transformer.forward`` calls on ``model.kv_prefix``: per-layer prefix keys/values, wrapped."""

    num_virtual: int

    def key_values(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer, keys and values ``[1, kv_heads, P, head_dim]``."""
        raise NotImplementedError

    def wrap(
        self,
        model: Any,
        cache: Any,
        input_ids: Tensor,
        positions: Tensor | None,
        attention_mask: Tensor | None,
        segment_ids: Tensor | None,
    ) -> PrefixedCache:
        keys, values = self.key_values(model)
        if cache is not None:
            return PrefixedCache(keys, values, cache)
        B, T = input_ids.shape
        meta = model.attn_meta(B, T, input_ids.device, positions, attention_mask, segment_ids)
        return PrefixedCache(keys, values, None, meta)


class KVPrefix(KVPrefixBase):
    """Prefix tuning's parameters (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, tokens: int, projection: bool = False, hidden: int = 0):
        super().__init__()
        self.num_virtual = tokens
        self.n_layers, self.kv_heads, self.head_dim = cfg.n_layers, cfg.kv_heads, cfg.dim_head
        kv_dim = self.kv_heads * self.head_dim
        width = self.n_layers * 2 * kv_dim
        self.projection = projection
        if projection:
            self.hidden = hidden or kv_dim
            self.embedding = nn.Embedding(tokens, kv_dim)
            self.transform = nn.Sequential(
                nn.Linear(kv_dim, self.hidden), nn.Tanh(), nn.Linear(self.hidden, width)
            )
        else:
            self.hidden = 0
            self.embedding = nn.Embedding(tokens, width)

    def flat(self) -> Tensor:
        """``[P, L * 2 * kv_dim]``: what PEFT saves as ``prompt_embeddings``."""
        w = self.embedding.weight
        return self.transform(w) if self.projection else w

    def key_values(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        P = self.num_virtual
        kv = self.flat().view(P, self.n_layers * 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return [kv[2 * i][None] for i in range(self.n_layers)], [
            kv[2 * i + 1][None] for i in range(self.n_layers)
        ]

    @torch.no_grad()
    def init_from_vocabulary(self, model: Any, generator: torch.Generator | None = None) -> None:
        """Start from the keys/values the base computes for ``P`` random vocabulary tokens (Li & Liang's
        advice: real activations train far better than N(0, 1) noise)."""
        P = self.num_virtual
        ids = torch.randint(0, model.cfg.vocab_size, (1, P), generator=generator).to(
            model.embed_tokens.weight.device
        )
        w = self.embedding.weight
        cache = KVCache(model.cfg, 1, P, dtype=w.dtype, device=w.device)
        training = model.training
        model.eval()  # no dropout in the activations we start from
        model(ids, cache=cache)
        model.train(training)
        k, v = cache.k[:, 0, :, :P], cache.v[:, 0, :, :P]  # [L, kv, P, hd]
        flat = torch.stack([k, v], dim=1).reshape(self.n_layers * 2, self.kv_heads, P, self.head_dim)
        w.copy_(flat.permute(2, 0, 1, 3).reshape(P, -1))


def attach(model: nn.Module, module: KVPrefixBase) -> None:
    if getattr(model, "kv_prefix", None) is not None:
        raise ConfigError("the model already has a prefix / soft prompt; one prefix method at a time")
    model.requires_grad_(False)
    model.kv_prefix = module
    module.requires_grad_(True)


def apply_prefix(model: Any, cfg: PrefixConfig, generator: torch.Generator | None = None) -> KVPrefix:
    check_prefix_fits(model.cfg, cfg.tokens, "prefix")
    if cfg.init not in ("vocab", "random"):
        raise ConfigError(f"config key 'prefix.init' must be vocab or random, got {cfg.init!r}")
    w = model.embed_tokens.weight
    prefix = KVPrefix(model.cfg, cfg.tokens, cfg.projection, cfg.hidden).to(device=w.device, dtype=w.dtype)
    if cfg.init == "vocab" and not cfg.projection:
        prefix.init_from_vocabulary(model, generator)
    attach(model, prefix)
    return prefix


def save_prefix(model: Any, directory: str | Path, base_model: str | None) -> Path:
    p: KVPrefix = model.kv_prefix
    cfg = model.cfg
    kv_dim = cfg.kv_heads * cfg.dim_head
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": p.num_virtual,
        "token_dim": kv_dim,  # PEFT sizes the prefix by the KV heads for grouped-query models
        "num_attention_heads": cfg.kv_heads,
        "num_layers": cfg.n_layers,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": p.hidden or kv_dim,
        "prefix_projection": p.projection,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    with torch.no_grad():
        flat = p.flat().float()
    return write_adapter(directory, config, {"prompt_embeddings": flat})


def load_prefix(model: Any, directory: str | Path, data: dict, trainable: bool) -> nn.Module:
    directory = Path(directory)
    cfg = model.cfg
    P = config_int(data, "num_virtual_tokens", directory)
    for key, want in (("num_layers", cfg.n_layers), ("token_dim", cfg.kv_heads * cfg.dim_head)):
        if config_int(data, key, directory) != want:
            raise CheckpointError(
                f"{directory}/adapter_config.json: '{key}' is {data[key]}, the base model has {want}"
            )
    if int(data.get("num_transformer_submodules", 1)) != 1:
        raise CheckpointError(f"{directory}/adapter_config.json: encoder-decoder prefixes are not supported")
    try:
        check_prefix_fits(cfg, P, "prefix")
    except ConfigError as exc:
        raise CheckpointError(f"{directory}/adapter_config.json: {exc}") from exc
    path, state = read_adapter_weights(directory)
    prefix = KVPrefix(cfg, P)  # the saved projected prefix, without the MLP that made it
    t = take_tensor(state, "prompt_embeddings", tuple(prefix.embedding.weight.shape), path)
    w = model.embed_tokens.weight
    prefix = prefix.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        prefix.embedding.weight.copy_(t.to(w.dtype))
    attach(model, prefix)
    prefix.requires_grad_(trainable)
    return model
