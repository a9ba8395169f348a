"""Prompt tuning (Lester et al. 2021): ``P`` trainable embeddings prepended to every input, in PEFT's format.

PEFT feeds ``[soft prompt; token embeddings]`` through the model, so the soft prompt takes positions
``0..P-1`` and the tokens start at ``P``. Attention is causal, so the prompt's keys and values in every layer
depend only on the prompt itself: running the layers over the soft prompt once gives a per-layer prefix,
and the tokens then go through :class:`~llmlab.model.peft.prefix.PrefixedCache` exactly like prefix tuning.
This is the same computation as concatenating embeddings (gradients reach the soft prompt through the
prefix), it returns logits for the real tokens only, and it works unchanged with the KV cache and the engine.

At inference (no grad, eval mode) the derived prefix is kept until the soft prompt's weights change, so a
decode step does not re-run the ``P`` prompt positions.

Parameters: ``prompt_embeddings [P, d_model]`` (``P * d_model`` trainable), started from the embeddings of
``P`` random vocabulary tokens (PEFT's ``SAMPLE_VOCAB``) or N(0, 1) (``RANDOM``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.errors import CheckpointError, ConfigError
from llmlab.model.peft.common import config_int, read_adapter_weights, take_tensor, write_adapter
from llmlab.model.peft.prefix import KVPrefixBase, attach, check_prefix_fits
from llmlab.model.transformer import AttnMeta


@dataclass
class PromptConfig:
    tokens: int = 16  # virtual tokens P
    init: str = "vocab"  # vocab: embeddings of random vocabulary tokens; random: N(0, 1)


class _Collect:
    """A one-shot cache that records each layer's keys/values of a causal forward from position 0."""

    def __init__(self, n_layers: int):
        self.keys: list[Tensor] = [torch.empty(0)] * n_layers
        self.values: list[Tensor] = [torch.empty(0)] * n_layers

    def prepare(self, num_new: int, cfg: Any) -> AttnMeta:
        raise NotImplementedError  # the soft prompt builds its own AttnMeta

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def advance(self, num_new: int) -> None:
        pass


class SoftPrompt(KVPrefixBase):
    def __init__(self, tokens: int, d_model: int):
        super().__init__()
        self.num_virtual = tokens
        self.embedding = nn.Embedding(tokens, d_model)
        self._cached: tuple[tuple, tuple[list[Tensor], list[Tensor]]] | None = None

    def key_values(self, model: Any) -> tuple[list[Tensor], list[Tensor]]:
        w = self.embedding.weight
        reuse = not torch.is_grad_enabled() and not model.training
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if reuse and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        P = self.num_virtual
        q_pos = torch.arange(P, device=w.device)[None]
        meta = AttnMeta(q_pos=q_pos, mask=None, is_causal=True)
        rope = model.rotary(q_pos)
        collect = _Collect(len(model.layers))
        x = w[None]
        for layer in model.layers:
            x = layer(x, rope, meta, collect)
        kv = (collect.keys, collect.values)
        self._cached = (key, kv) if reuse else None
        return kv


def apply_prompt(model: Any, cfg: PromptConfig, generator: torch.Generator | None = None) -> SoftPrompt:
    check_prefix_fits(model.cfg, cfg.tokens, "prompt")
    if cfg.init not in ("vocab", "random"):
        raise ConfigError(f"config key 'prompt.init' must be vocab or random, got {cfg.init!r}")
    w = model.embed_tokens.weight
    prompt = SoftPrompt(cfg.tokens, model.cfg.d_model).to(device=w.device, dtype=w.dtype)
    if cfg.init == "vocab":
        ids = torch.randint(0, model.cfg.vocab_size, (cfg.tokens,), generator=generator).to(w.device)
        with torch.no_grad():
            prompt.embedding.weight.copy_(w[ids])
    attach(model, prompt)
    return prompt


def save_prompt(model: Any, directory: str | Path, base_model: str | None) -> Path:
    p: SoftPrompt = model.kv_prefix
    cfg = model.cfg
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": p.num_virtual,
        "token_dim": cfg.d_model,
        "num_attention_heads": cfg.n_heads,
        "num_layers": cfg.n_layers,
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",  # how PEFT would initialize before loading; the weights follow
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    return write_adapter(directory, config, {"prompt_embeddings": p.embedding.weight.float()})


def load_prompt(model: Any, directory: str | Path, data: dict, trainable: bool) -> Any:
    directory = Path(directory)
    cfg = model.cfg
    P = config_int(data, "num_virtual_tokens", directory)
    if config_int(data, "token_dim", directory) != cfg.d_model:
        raise CheckpointError(
            f"{directory}/adapter_config.json: 'token_dim' is {data['token_dim']}, the base model has "
            f"d_model {cfg.d_model}"
        )
    try:
        check_prefix_fits(cfg, P, "prompt")
    except ConfigError as exc:
        raise CheckpointError(f"{directory}/adapter_config.json: {exc}") from exc
    path, state = read_adapter_weights(directory)
    t = take_tensor(state, "prompt_embeddings", (P, cfg.d_model), path)
    w = model.embed_tokens.weight
    prompt = SoftPrompt(P, cfg.d_model).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        prompt.embedding.weight.copy_(t.to(w.dtype))
    attach(model, prompt)
    prompt.requires_grad_(trainable)
    return model
