"""Continual pre-training: start a run from an existing model's weights and tokenizer.

``llmlab pretrain --init-from MODEL`` takes anything :func:`llmlab.load` reads (an llmlab checkpoint or run
directory, a Hugging Face directory, a GGUF file, ``smollm2``). The run's model config becomes the loaded
model's config, with only the ``model.*`` overrides the user gave applied on top: keys that keep every weight
shape (``max_seq_len``, ``rope_scaling.*``, ``dropout``) are how context extension by training works;
a key that changes a shape is refused by :func:`load_init_model`, naming the tensor.

The data must be tokenized with the model's own tokenizer: :func:`check_vocab_match` compares the data's
tokenizer (saved beside its shards) with the model's and names both when they differ. Replay of the
original domain and the LR re-warming / re-decay schedule live elsewhere (:class:`llmlab.data.mixture.ReplayLoader`
and ``train.warmup_steps`` / ``train.schedule``): continual pre-training is a pretraining run with a
different starting point, not a second loop.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from llmlab.config import parse_overrides, qualify_key, set_key
from llmlab.errors import ConfigError
from llmlab.model.checkpoint import check_state
from llmlab.model.config import ModelConfig
from llmlab.model.transformer import Transformer
from llmlab.train.evaluation import evaluate_loss

MODEL_PREFIX = "model."
# The model init_model_config had to load (non-llmlab formats), kept for the load_init_model that follows.
_LOADED: dict[str, tuple[Any, Any]] = {}


def init_model_config(init_from: str | Path) -> ModelConfig:
    """The model config of ``init_from`` (read from ``config.json`` for llmlab checkpoints, else by loading)."""
    from llmlab.loading import checkpoint_kind, resolve_model_path, resolve_run_dir
    from llmlab.model.checkpoint import read_config

    path, adapter = resolve_run_dir(resolve_model_path(init_from))
    if adapter is None and checkpoint_kind(path) == "llmlab":
        return ModelConfig.from_dict(read_config(path)["model"], source=str(path))
    loaded = _load(init_from)
    _LOADED[str(init_from)] = loaded  # load_init_model takes it from here: a GGUF/HF model loads once
    return copy.deepcopy(loaded[0].cfg)


def apply_model_overrides(
    model_cfg: ModelConfig, overrides: list[str], root: type, init_from: str | Path
) -> ModelConfig:
    """``model_cfg`` with the ``model.*`` keys of ``overrides`` (qualified against ``root``) set on it."""
    holder = _ModelHolder(model_cfg)
    for key, value in parse_overrides(overrides):
        qualified = qualify_key(root, key)
        if qualified.startswith(MODEL_PREFIX):
            set_key(holder, qualified, value)
    try:
        holder.model.validate()
    except ConfigError as exc:
        raise ConfigError(f"--init-from {init_from}: {exc}") from exc
    return holder.model


@dataclass
class _ModelHolder:
    """Lets :func:`set_key` resolve ``model.x.y`` against a bare ModelConfig."""

    model: ModelConfig


def _load(init_from: str | Path) -> tuple[Any, Any]:
    from llmlab.loading import load

    model, tokenizer = load(init_from)
    if not isinstance(model, Transformer):
        raise ConfigError(
            f"--init-from {init_from}: loads as {type(model).__name__}, not a plain llmlab Transformer "
            "(quantized or adapted models cannot be trained further in full)"
        )
    return model, tokenizer


def load_init_model(init_from: str | Path, model_cfg: ModelConfig) -> tuple[Transformer, Any]:
    """A fresh :class:`Transformer` of ``model_cfg`` holding ``init_from``'s weights, and its tokenizer.

    ``model_cfg`` may differ from the saved config only in keys that keep every weight shape (context length,
    RoPE scaling, dropout); the buffers that depend on them (RoPE tables, masks) are built for the new config.
    """
    loaded, tokenizer = _LOADED.pop(str(init_from), None) or _load(init_from)
    state = {k: v.float() for k, v in loaded.state_dict().items()}
    del loaded
    model = Transformer(model_cfg)
    check_state(model, state, f"--init-from {init_from} (against the run's model config)")
    model.load_state_dict(state, strict=True)
    return model, tokenizer


def _vocab(tokenizer: Any) -> dict[str, int] | None:
    backend = getattr(tokenizer, "backend", None)
    return backend.get_vocab() if backend is not None and hasattr(backend, "get_vocab") else None


def _first_difference(model_vocab: dict[str, int], data_vocab: dict[str, int]) -> str:
    """``"; e.g. 'x' is id 3 for the model, 7 for the data"`` for the lowest-id token the two disagree on."""
    small, other = (
        (model_vocab, data_vocab) if len(model_vocab) <= len(data_vocab) else (data_vocab, model_vocab)
    )
    for token, idx in sorted(small.items(), key=lambda kv: kv[1]):
        if other.get(token) != idx:
            model_id, data_id = model_vocab.get(token), data_vocab.get(token)
            return f"; e.g. {token!r} is id {model_id} for the model, {data_id} for the data"
    return ""


def check_vocab_match(
    init_from: str | Path,
    model_cfg: ModelConfig,
    model_tokenizer: Any | None,
    data_dir: str | Path,
    data_meta: dict[str, Any],
    data_tokenizer: Any | None,
) -> None:
    """ConfigError naming the model and the data when the data was not tokenized with the model's vocabulary."""
    data_vocab = int(data_meta.get("vocab_size", 0))
    where = f"the data at {data_dir}"
    if data_vocab > model_cfg.vocab_size:
        raise ConfigError(
            f"--init-from {init_from}: the model's vocabulary ({model_cfg.vocab_size} ids) does not cover "
            f"{where} ({data_vocab}-token tokenizer); prepare the data with the model's tokenizer"
        )
    if model_tokenizer is None or data_tokenizer is None:
        return  # nothing more to compare: the ids fit in the embedding table
    model_vocab, data_tok_vocab = _vocab(model_tokenizer), _vocab(data_tokenizer)
    if model_vocab is not None and data_tok_vocab is not None and model_vocab != data_tok_vocab:
        example = _first_difference(model_vocab, data_tok_vocab)
        raise ConfigError(
            f"--init-from {init_from}: the model's tokenizer ({len(model_vocab)} tokens) does not match the "
            f"tokenizer of {where} ({len(data_tok_vocab)} tokens{example}); prepare the data with the "
            "model's tokenizer (llmlab data prepare --tokenizer MODEL_DIR) or use a new data.dir"
        )


def with_extra_eval(
    eval_fn: Callable[[nn.Module], dict[str, float]],
    name: str,
    batches: Callable[[], Iterable[dict[str, Any]]],
) -> Callable[[nn.Module], dict[str, float]]:
    """``eval_fn`` plus ``{name}_loss``: the held-out loss on a second set (the old domain, for forgetting)."""

    def both(model: nn.Module) -> dict[str, float]:
        metrics = eval_fn(model)
        metrics[f"{name}_loss"] = evaluate_loss(model, batches())["loss"]
        return metrics

    return both
