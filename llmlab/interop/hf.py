"""Hugging Face checkpoints, both ways: ``config.json`` + (sharded) safetensors for llama, qwen2, qwen3, mistral,
gpt2, and the MoE families mixtral, qwen2_moe, qwen3_moe (their expert tensors: :mod:`llmlab.interop.hf_moe`).

Reading maps the HF config onto :class:`~llmlab.model.config.ModelConfig` and renames (and for GPT-2
transposes/splits) the tensors onto llmlab's module names, which already follow HF Llama's layout. Writing
does the reverse and produces a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads,
plus ``tokenizer.json``/``tokenizer_config.json``/``generation_config.json`` when a tokenizer is given.

No transformers import is needed here: the format is plain JSON and safetensors, so ``llmlab`` can read
and write HF checkpoints without that (large) dependency. The tests check parity against transformers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from llmlab.errors import CheckpointError, ConfigError
from llmlab.interop.hf_moe import (
    MOE_BASE_TYPES,
    MOE_MODEL_TYPES,
    moe_config_from_hf,
    moe_config_to_hf,
    moe_model_type,
    moe_state_from_hf,
    moe_state_to_hf,
)
from llmlab.model.checkpoint import atomic_write_dir, load_state_dict
from llmlab.model.config import ModelConfig, RopeScaling

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", *MOE_MODEL_TYPES)
DEFAULT_MAX_SHARD_SIZE = "5GB"

# transformers' activation names -> llmlab's.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
_ACTIVATIONS_BACK = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_GPT2_ACT_BACK = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


# ---------------------------------------------------------------------------------------------- detection
def is_hf_checkpoint(path: str | Path) -> bool:
    """A directory with an HF ``config.json`` (a ``model_type`` key) and safetensors weights."""
    path = Path(path)
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "model_type" in data


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    file = Path(directory) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (not a Hugging Face checkpoint)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


# ------------------------------------------------------------------------------------------ HF -> llmlab
def _rope_from_hf(hf: dict[str, Any], max_pos: int, source: str) -> tuple[float, RopeScaling]:
    """RoPE base and scaling from either layout.

    transformers 5 keeps both in ``rope_parameters`` (``rope_theta``, ``rope_type`` and the scaling keys);
    older configs have a top-level ``rope_theta`` and a ``rope_scaling`` dict (keyed ``type`` or ``rope_type``).
    """
    params = dict(hf.get("rope_parameters") or {})
    if isinstance(hf.get("rope_scaling"), dict):
        params = {**hf["rope_scaling"], **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: key 'partial_rotary_factor' != 1 is not supported")
    if kind in ("default", None):
        return float(theta), RopeScaling()
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if kind == "linear":
        return float(theta), RopeScaling(type="linear", factor=float(params["factor"]))
    if kind == "dynamic":
        # transformers' dynamic NTK measures the length against max_position_embeddings itself.
        return float(theta), RopeScaling(
            type="dynamic", factor=float(params["factor"]), original_max_seq_len=max_pos
        )
    if kind == "yarn":
        original = int(original or max_pos)
        factor = params.get("factor")
        factor = float(factor) if factor is not None else max_pos / original
        return float(theta), RopeScaling(
            type="yarn",
            factor=factor,
            original_max_seq_len=original,
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=params.get("attention_factor"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
        )
    if kind == "llama3":
        return float(theta), RopeScaling(
            type="llama3",
            factor=float(params["factor"]),
            original_max_seq_len=int(original or max_pos),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
        )
    raise CheckpointError(
        f"{source}: rope type {kind!r} is not supported (llmlab has linear/dynamic/yarn/llama3)"
    )


def _activation(name: str, source: str, key: str) -> str:
    if name not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: key '{key}' = {name!r} is not supported ({sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def config_from_hf(hf: dict[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
    """Map an HF ``config.json`` dict onto a validated :class:`ModelConfig` (errors name ``source`` and key)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: key 'model_type' = {model_type!r} is not supported (one of {list(SUPPORTED_MODEL_TYPES)})"
        )
    try:
        if model_type == "gpt2":
            cfg = _gpt2_config(hf, source)
        elif model_type in MOE_MODEL_TYPES:  # the dense sibling's layout plus the experts (interop/hf_moe.py)
            base = _llama_like_config(hf, MOE_BASE_TYPES[model_type], source)
            cfg = moe_config_from_hf(hf, model_type, base, source)
        else:
            cfg = _llama_like_config(hf, model_type, source)
    except KeyError as exc:
        raise CheckpointError(f"{source}: missing key {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: bad value ({exc})") from exc
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return cfg


def _llama_like_config(hf: dict[str, Any], model_type: str, source: str) -> ModelConfig:
    n_layers = int(hf["num_hidden_layers"])
    max_pos = int(hf.get("max_position_embeddings", 2048))
    theta, scaling = _rope_from_hf(hf, max_pos, source)
    window = None
    if model_type == "mistral":
        window = hf.get("sliding_window")
    elif model_type in ("qwen2", "qwen3"):
        # Qwen2/3 window only the layers marked "sliding_attention" (those >= max_window_layers).
        layer_types = hf.get("layer_types")
        if layer_types is None and hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
            first = int(hf.get("max_window_layers", n_layers))
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        sliding = [t == "sliding_attention" for t in (layer_types or [])]
        if any(sliding) and hf.get("use_sliding_window", True):
            if not all(sliding):
                raise CheckpointError(
                    f"{source}: key 'max_window_layers'/'layer_types': a sliding window on only some layers "
                    "is not supported (llmlab uses one window for all layers)"
                )
            window = hf.get("sliding_window")
    if model_type in ("llama", "qwen3"):
        attn_bias = bool(hf.get("attention_bias", False))
        qkv_bias, out_bias, mlp_bias = attn_bias, attn_bias, bool(hf.get("mlp_bias", False))
    elif model_type == "qwen2":
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        qkv_bias = out_bias = mlp_bias = False
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=n_layers,
        n_heads=int(hf["num_attention_heads"]),
        n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
        d_ff=int(hf["intermediate_size"]),
        max_seq_len=max_pos,
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        ffn="swiglu",
        activation=_activation(hf.get("hidden_act", "silu"), source, "hidden_act"),
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        qk_norm=model_type == "qwen3",
        out_bias=out_bias,
        mlp_bias=mlp_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # llama/qwen2/mistral default
        sliding_window=int(window) if window is not None else None,
        arch=model_type,
    )


def _gpt2_config(hf: dict[str, Any], source: str) -> ModelConfig:
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(key):
            raise CheckpointError(f"{source}: key '{key}' = true is not supported")
    if hf.get("scale_attn_weights", True) is False:
        raise CheckpointError(f"{source}: key 'scale_attn_weights' = false is not supported")
    d = int(hf["n_embd"])
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=d,
        n_layers=int(hf["n_layer"]),
        n_heads=int(hf["n_head"]),
        d_ff=int(hf.get("n_inner") or 4 * d),
        max_seq_len=int(hf.get("n_positions", 1024)),
        norm="layernorm",
        norm_bias=True,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        ffn="gelu",
        activation=_activation(hf.get("activation_function", "gelu_new"), source, "activation_function"),
        position="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        arch="gpt2",
    )


def _strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``model.layers.0...`` -> ``layers.0...`` (a bare ``LlamaModel`` save has no prefix)."""
    return {k.removeprefix(prefix): v for k, v in state.items()}


def state_from_hf(state: dict[str, Tensor], cfg: ModelConfig, source: str) -> dict[str, Tensor]:
    """Rename (and for GPT-2 transpose/split) HF tensors to llmlab's names."""
    if cfg.arch == "gpt2":
        return _gpt2_state_from_hf(state, cfg, source)
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            if cfg.tie_embeddings:
                continue  # some tied checkpoints still store the (identical) head
            out[key] = value
        elif key.startswith("model."):
            if key.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints saved the RoPE buffer; we recompute it
            out[key.removeprefix("model.")] = value
        else:
            out[key] = value
    return moe_state_from_hf(out, cfg, source) if cfg.ffn == "moe" else out


def _gpt2_state_from_hf(state: dict[str, Tensor], cfg: ModelConfig, source: str) -> dict[str, Tensor]:
    state = _strip_prefix(state, "transformer.")
    d = cfg.d_model
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"{source}: missing tensor '{key}'")
        return state[key]

    out["embed_tokens.weight"] = take("wte.weight")
    out["embed_positions.weight"] = take("wpe.weight")
    out["norm.weight"], out["norm.bias"] = take("ln_f.weight"), take("ln_f.bias")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        h, o = f"h.{i}.", f"layers.{i}."
        out[o + "input_layernorm.weight"], out[o + "input_layernorm.bias"] = (
            take(h + "ln_1.weight"),
            take(h + "ln_1.bias"),
        )
        out[o + "post_attention_layernorm.weight"] = take(h + "ln_2.weight")
        out[o + "post_attention_layernorm.bias"] = take(h + "ln_2.bias")
        # Conv1D stores weights as [in, out]; nn.Linear wants [out, in]. c_attn fuses q, k, v along out.
        w, b = take(h + "attn.c_attn.weight"), take(h + "attn.c_attn.bias")
        if tuple(w.shape) != (d, 3 * d):
            raise CheckpointError(
                f"{source}: tensor '{h}attn.c_attn.weight' has shape {tuple(w.shape)}, expected {(d, 3 * d)}"
            )
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[o + f"self_attn.{name}.weight"] = w[:, j * d : (j + 1) * d].t().contiguous()
            out[o + f"self_attn.{name}.bias"] = b[j * d : (j + 1) * d].contiguous()
        out[o + "self_attn.o_proj.weight"] = take(h + "attn.c_proj.weight").t().contiguous()
        out[o + "self_attn.o_proj.bias"] = take(h + "attn.c_proj.bias")
        out[o + "mlp.up_proj.weight"] = take(h + "mlp.c_fc.weight").t().contiguous()
        out[o + "mlp.up_proj.bias"] = take(h + "mlp.c_fc.bias")
        out[o + "mlp.down_proj.weight"] = take(h + "mlp.c_proj.weight").t().contiguous()
        out[o + "mlp.down_proj.bias"] = take(h + "mlp.c_proj.bias")
    return out


def read_safetensors_dir(directory: str | Path) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: corrupt shard index ({exc})") from exc
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_state_dict(directory / shard))
        missing = [k for k in weight_map if k not in state]
        if missing:
            raise CheckpointError(f"{index}: tensor '{missing[0]}' is listed but not in its shard")
        return state
    if (directory / SAFETENSORS_FILE).is_file():
        return load_state_dict(directory / SAFETENSORS_FILE)
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory}: only pickle weights (*.bin/*.pt) found; llmlab reads safetensors only (never pickle)"
        )
    raise CheckpointError(f"{directory}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def load_hf(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """Load an HF checkpoint dir -> ``(Transformer, Tokenizer or None)``."""
    from llmlab.interop.build import build_model

    directory = Path(directory)
    source = str(directory / CONFIG_FILE)
    cfg = config_from_hf(read_hf_config(directory), source)
    state = state_from_hf(read_safetensors_dir(directory), cfg, str(directory))
    model = build_model(cfg, state, str(directory), device=device, dtype=dtype)
    return model, load_hf_tokenizer(directory)


def load_hf_tokenizer(directory: str | Path) -> Any:
    """``tokenizer.json`` + ``tokenizer_config.json`` (+ stop ids from ``generation_config.json``), or None."""
    from llmlab.tokenizer import TOKENIZER_FILE, Tokenizer

    directory = Path(directory)
    if not (directory / TOKENIZER_FILE).is_file():
        return None
    tok = Tokenizer.from_file(directory)
    if isinstance(tok.chat_template, list):
        # Some repos store several named templates: [{"name": "default", "template": ...}, ...].
        named = {t.get("name"): t.get("template") for t in tok.chat_template if isinstance(t, dict)}
        tok.chat_template = named.get("default", next(iter(named.values()), None))
    gen = directory / GENERATION_CONFIG_FILE
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            eos = None
        # Chat models often stop on several ids (e.g. <|im_end|> and <|endoftext|>).
        for idx in eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []:
            token = tok.id_to_token(int(idx))
            if token is not None and token != tok.eos_token and token not in tok.extra_stop_tokens:
                tok.extra_stop_tokens.append(token)
    return tok


# ------------------------------------------------------------------------------------------ llmlab -> HF
def hf_model_type(cfg: ModelConfig) -> str:
    """The HF family that represents ``cfg`` exactly, or a ConfigError naming what does not fit."""

    def need(cond: bool, what: str, family: str) -> None:
        if not cond:
            raise ConfigError(f"model config: cannot export to HF '{family}': {what}")

    if cfg.position == "learned" or cfg.arch == "gpt2":
        fam = "gpt2"
        need(cfg.position == "learned", "needs position='learned'", fam)
        need(cfg.norm == "layernorm" and cfg.norm_bias, "needs norm='layernorm' with norm_bias", fam)
        need(cfg.ffn == "gelu", "needs ffn='gelu'", fam)
        need(cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias, "needs qkv_bias, out_bias and mlp_bias", fam)
        need(cfg.head_dim in (None, cfg.d_model // cfg.n_heads), "needs head_dim = d_model / n_heads", fam)
        need(cfg.kv_heads == cfg.n_heads, "needs n_kv_heads = n_heads", fam)
        need(cfg.sliding_window is None, "has no sliding window", fam)
        return fam
    fam = "llama-like"
    need(cfg.position == "rope", f"position={cfg.position!r} has no HF equivalent here", fam)
    need(cfg.norm == "rmsnorm", "needs norm='rmsnorm'", fam)
    need(cfg.ffn in ("swiglu", "moe"), "needs ffn='swiglu' (or 'moe')", fam)
    need(cfg.rope_scaling.type != "ntk", "rope_scaling 'ntk' has no HF equivalent", fam)
    if cfg.ffn == "moe":
        return moe_model_type(cfg)
    if cfg.qk_norm:
        need(cfg.qkv_bias == cfg.out_bias and not cfg.mlp_bias, "attention_bias covers q/k/v and o", "qwen3")
        return "qwen3"
    if cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias:
        return "qwen2"
    if cfg.sliding_window is not None:
        need(not (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias), "mistral has no biases", "mistral")
        return "mistral"
    need(cfg.qkv_bias == cfg.out_bias, "llama's attention_bias covers q/k/v and o together", "llama")
    if cfg.arch == "mistral" and not (cfg.qkv_bias or cfg.mlp_bias):
        return "mistral"
    return "llama"


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rs = cfg.rope_scaling
    params: dict[str, Any] = {
        "rope_theta": cfg.rope_theta,
        "rope_type": "default" if rs.type == "none" else rs.type,
    }
    if rs.type in ("linear", "dynamic", "yarn", "llama3"):
        params["factor"] = rs.factor
    if rs.type == "dynamic" and rs.original_max_seq_len not in (None, cfg.max_seq_len):
        raise ConfigError(
            "model config: HF dynamic RoPE needs rope_scaling.original_max_seq_len = max_seq_len"
        )
    if rs.type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = rs.original_max_seq_len or cfg.max_seq_len
    if rs.type == "yarn":
        params.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, truncate=rs.truncate)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(rs, key) is not None:
                params[key] = getattr(rs, key)
    if rs.type == "llama3":
        params.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
    return params


def config_to_hf(cfg: ModelConfig, tokenizer: Any | None = None) -> dict[str, Any]:
    """An HF ``config.json`` dict that transformers turns into the same model."""
    model_type = hf_model_type(cfg)
    if model_type in MOE_MODEL_TYPES:  # the dense sibling's dict, then the MoE keys
        return moe_config_to_hf(cfg, model_type, config_to_hf(_dense_sibling(cfg, model_type), tokenizer))
    special = {}
    if tokenizer is not None:
        special = {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        }
    if model_type == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.ffn_dim,
            "n_positions": cfg.max_seq_len,
            "activation_function": _GPT2_ACT_BACK[cfg.activation],
            "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "dtype": "float32",
            **special,
        }
    arch = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "mistral": "MistralForCausalLM",
    }[model_type]
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head,
        "hidden_act": _ACTIVATIONS_BACK[cfg.activation],
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "dtype": "float32",
        # Both layouts: transformers 5 reads rope_parameters, 4.x reads rope_theta/rope_scaling.
        "rope_parameters": _rope_to_hf(cfg),
        "rope_theta": cfg.rope_theta,
        **special,
    }
    if cfg.rope_scaling.type != "none":
        rs = dict(out["rope_parameters"])
        rs.pop("rope_theta")
        out["rope_scaling"] = rs
    if model_type in ("llama", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if model_type == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    elif model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if model_type in ("qwen2", "qwen3"):
        window = cfg.sliding_window
        out.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=0 if window is not None else cfg.n_layers,
            layer_types=["sliding_attention" if window is not None else "full_attention"] * cfg.n_layers,
        )
    return out


def _dense_sibling(cfg: ModelConfig, moe_type: str) -> ModelConfig:
    """The dense config whose HF dict an MoE family's extends (same attention, norms and RoPE)."""
    return dataclasses.replace(cfg, ffn="swiglu", arch=MOE_BASE_TYPES[moe_type])


def state_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """llmlab tensor names -> HF's (``model.`` prefix; GPT-2: fused, transposed Conv1D weights)."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    model_type = hf_model_type(cfg)
    if model_type in MOE_MODEL_TYPES:
        state = moe_state_to_hf(state, model_type)
    if model_type != "gpt2":
        out = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v for k, v in state.items()}
        return out
    out = {
        "transformer.wte.weight": state["embed_tokens.weight"],
        "transformer.wpe.weight": state["embed_positions.weight"],
        "transformer.ln_f.weight": state["norm.weight"],
        "transformer.ln_f.bias": state["norm.bias"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layers):
        o, h = f"layers.{i}.", f"transformer.h.{i}."
        out[h + "ln_1.weight"], out[h + "ln_1.bias"] = (
            state[o + "input_layernorm.weight"],
            state[o + "input_layernorm.bias"],
        )
        out[h + "ln_2.weight"] = state[o + "post_attention_layernorm.weight"]
        out[h + "ln_2.bias"] = state[o + "post_attention_layernorm.bias"]
        qkv = [state[o + f"self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t().contiguous()
        out[h + "attn.c_attn.bias"] = torch.cat(
            [state[o + f"self_attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")]
        )
        out[h + "attn.c_proj.weight"] = state[o + "self_attn.o_proj.weight"].t().contiguous()
        out[h + "attn.c_proj.bias"] = state[o + "self_attn.o_proj.bias"]
        out[h + "mlp.c_fc.weight"] = state[o + "mlp.up_proj.weight"].t().contiguous()
        out[h + "mlp.c_fc.bias"] = state[o + "mlp.up_proj.bias"]
        out[h + "mlp.c_proj.weight"] = state[o + "mlp.down_proj.weight"].t().contiguous()
        out[h + "mlp.c_proj.bias"] = state[o + "mlp.down_proj.bias"]
    return out


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as transformers; ``KiB``/``MiB``/``GiB`` binary)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ConfigError(f"bad size {size!r}: use e.g. 5GB, 500MB, 100KB or a number of bytes")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ConfigError(f"bad size {size!r}: must be positive")
    return value


def write_sharded_safetensors(
    directory: Path, state: dict[str, Tensor], max_shard_size: int | str
) -> list[str]:
    """Write ``state`` as one ``model.safetensors`` or as HF-style shards + ``model.safetensors.index.json``.

    Tensors go into shards in order, a new shard starting when the next tensor would pass the limit (a tensor
    larger than the limit gets a shard of its own), exactly as transformers' ``save_pretrained`` does.
    """
    limit = parse_size(max_shard_size)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})
        return [SAFETENSORS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return names


def write_hf_tokenizer(directory: Path, tokenizer: Any, max_len: int) -> None:
    """``tokenizer.json`` + an HF ``tokenizer_config.json`` (with the chat template) + ``generation_config.json``."""
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    meta = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "add_bos_token": tokenizer.add_bos,
        "model_max_length": max_len,
        "chat_template": tokenizer.chat_template,
        "extra_stop_tokens": tokenizer.extra_stop_tokens,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    stop = tokenizer.stop_ids
    gen = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stop if len(stop) > 1 else (stop[0] if stop else None),
        "pad_token_id": tokenizer.pad_id,
    }
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2), encoding="utf-8")


def save_hf(
    directory: str | Path,
    model: Any,
    tokenizer: Any | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
) -> Path:
    """Atomically write ``model`` (and ``tokenizer``) as an HF checkpoint directory."""
    cfg: ModelConfig = model.cfg
    config = config_to_hf(cfg, tokenizer)
    integer = [k for k, v in model.state_dict().items() if not v.is_floating_point()]
    if integer:
        # Quantized layers' codes would load as nothing in transformers (it re-initializes the projections).
        raise ConfigError(
            f"{directory}: the model holds quantized layers ('{integer[0]}'); an HF directory has no slot for "
            "llmlab's codes: dequantize first (llmlab.quant.common.dequantize_model; llmlab convert does)"
        )
    state = state_to_hf(model.state_dict(), cfg)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    if cfg.tie_embeddings:
        # safetensors refuses shared storage; the tied head is implied by tie_word_embeddings.
        state.pop("lm_head.weight", None)

    def write(tmp: Path) -> None:
        write_sharded_safetensors(tmp, state, max_shard_size)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
        if tokenizer is not None:
            write_hf_tokenizer(tmp, tokenizer, cfg.max_seq_len)

    return atomic_write_dir(directory, write)
