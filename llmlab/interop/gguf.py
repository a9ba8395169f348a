"""Read GGUF files (llama.cpp's format): config, weights and tokenizer into llmlab's model and Tokenizer.

A GGUF holds three things, all of which we map:

- **metadata** ``{arch}.block_count``, ``{arch}.embedding_length``, ... -> :class:`ModelConfig`;
- **tensors** ``blk.N.attn_q.weight`` ... in F32/F16/BF16 or a block-quantized type. We dequantize
  F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 to fp32 with ``gguf.quants.dequantize`` and refuse anything else with the
  tensor's name and type. For the llama arch, llama.cpp's converter permuted the rows of ``attn_q``/``attn_k``
  (its RoPE rotates interleaved pairs, HF's rotates halves): we undo that permutation;
- **tokenizer** ``tokenizer.ggml.tokens/merges/token_type`` (GPT-2-style byte-level BPE) and
  ``tokenizer.chat_template`` -> a ``tokenizers.Tokenizer`` wrapped in llmlab's :class:`Tokenizer`.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmlab.errors import CheckpointError, ConfigError
from llmlab.interop.gguf_moe import GGUF_EXTRA_ARCHS, gguf_extra_fields, gguf_extra_name, gguf_extra_value
from llmlab.model.config import ModelConfig, RopeScaling

SUPPORTED_ARCHS = ("llama", "qwen2", *GGUF_EXTRA_ARCHS)  # QK-norm and MoE layouts: interop/gguf_moe.py
_MISSING = object()

# GGUF tensor names (per block and global) -> llmlab's module names.
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _supported_types() -> set[Any]:
    from gguf import GGMLQuantizationType as Q

    return {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}


# ------------------------------------------------------------------------------------------------ reading
def open_gguf(path: str | Path) -> Any:
    """``gguf.GGUFReader`` (memory-mapped) with a CheckpointError for a missing or corrupt file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: not a valid GGUF file ({exc})") from exc


def _field(reader: Any, key: str, default: Any = _MISSING, source: str = "") -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"{source}: GGUF metadata key '{key}' missing")
        return default
    return field.contents()


def config_from_gguf(reader: Any, source: str) -> ModelConfig:
    """Map GGUF metadata (and which tensors exist) onto a validated :class:`ModelConfig`."""
    arch = _field(reader, "general.architecture", source=source)
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"{source}: GGUF 'general.architecture' = {arch!r} is not supported (one of {list(SUPPORTED_ARCHS)})"
        )

    def get(key: str, default: Any = _MISSING) -> Any:
        return _field(reader, f"{arch}.{key}", default, source)

    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(
            f"{source}: tensor 'rope_freqs.weight' (per-frequency RoPE factors) is not supported"
        )
    d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", d_model // n_heads))
    rot_dim = int(get("rope.dimension_count", head_dim))
    if rot_dim != head_dim:
        raise CheckpointError(
            f"{source}: partial RoPE ('{arch}.rope.dimension_count' = {rot_dim}) is not supported"
        )
    n_ctx = int(get("context_length", 2048))
    kind = get("rope.scaling.type", "none")
    factor = float(get("rope.scaling.factor", 1.0))
    original = get("rope.scaling.original_context_length", None)
    if kind in ("none", None) or factor == 1.0:
        scaling = RopeScaling()
    elif kind == "linear":
        scaling = RopeScaling(type="linear", factor=factor)
    elif kind == "yarn":
        scaling = RopeScaling(type="yarn", factor=factor, original_max_seq_len=int(original or n_ctx))
    else:
        raise CheckpointError(f"{source}: GGUF '{arch}.rope.scaling.type' = {kind!r} is not supported")
    token_embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if token_embd is None:
        raise CheckpointError(f"{source}: tensor 'token_embd.weight' missing")
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts: llmlab has one count for all layers
        if len(set(n_kv)) != 1:
            raise CheckpointError(
                f"{source}: per-layer '{arch}.attention.head_count_kv' values are not supported"
            )
        n_kv = n_kv[0]
    cfg = ModelConfig(
        vocab_size=int(token_embd.shape[1]),  # GGUF shapes are [cols, rows]
        d_model=d_model,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=head_dim if head_dim != d_model // n_heads else None,
        d_ff=int(get("feed_forward_length")),
        max_seq_len=n_ctx,
        norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        ffn="swiglu",
        activation="silu",
        position="rope",
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        qkv_bias="blk.0.attn_q.bias" in names,
        out_bias="blk.0.attn_output.bias" in names,
        tie_embeddings="output.weight" not in names,
        arch=arch,
    )
    cfg = dataclasses.replace(cfg, **gguf_extra_fields(arch, get, names, source))
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return cfg


def _unpermute(w: Tensor, n_head: int) -> Tensor:
    """Undo llama.cpp's ``permute`` of q/k rows (interleaved RoPE pairs -> HF's half-split layout).

    llama.cpp wrote ``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``; swapping the same axes back inverts it.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize_tensor(tensor: Any, source: str) -> Tensor:
    """One GGUF tensor -> fp32 torch tensor in PyTorch's ``[rows, cols]`` order."""
    from gguf.quants import dequantize

    if tensor.tensor_type not in _supported_types():
        raise CheckpointError(
            f"{source}: tensor '{tensor.name}' has type {tensor.tensor_type.name}, which llmlab cannot dequantize "
            "(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)"
        )
    array = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if not array.flags.writeable:
        array = array.copy()  # F32 tensors are views of the read-only memory map; the model needs its own
    return torch.from_numpy(array.reshape(tuple(int(n) for n in reversed(tensor.shape))))


def state_from_gguf(reader: Any, cfg: ModelConfig, source: str) -> dict[str, Tensor]:
    from tqdm import tqdm

    state: dict[str, Tensor] = {}
    # A progress bar on a terminal only (disable=None): a 7B file takes minutes to dequantize.
    for tensor in tqdm(reader.tensors, desc=f"dequantizing {Path(source).name}", unit="tensor", disable=None):
        parts = tensor.name.split(".")
        if len(parts) != (4 if parts[0] == "blk" else 2):
            raise CheckpointError(f"{source}: unexpected tensor '{tensor.name}'")
        if parts[0] == "blk":
            layer, base, suffix = parts[1], parts[2], parts[3]
            extra = gguf_extra_name(layer, base, suffix)
            if extra is not None:  # QK-norm / MoE tensors
                state[extra] = gguf_extra_value(base, dequantize_tensor(tensor, source))
                continue
            if base not in _BLOCK_NAMES:
                raise CheckpointError(f"{source}: unexpected tensor '{tensor.name}'")
            name = f"layers.{layer}.{_BLOCK_NAMES[base]}.{suffix}"
        elif parts[0] in _GLOBAL_NAMES:
            name = f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
        else:
            raise CheckpointError(f"{source}: unexpected tensor '{tensor.name}'")
        value = dequantize_tensor(tensor, source)
        if cfg.arch in ("llama", "mixtral") and parts[0] == "blk" and base in ("attn_q", "attn_k"):
            value = _unpermute(value, cfg.n_heads if base == "attn_q" else cfg.kv_heads)
        state[name] = value
    return state


# ---------------------------------------------------------------------------------------------- tokenizer
@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


# Pre-tokenizer split patterns for the `tokenizer.ggml.pre` values we know (from the models' tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}  # fmt: skip


def _pre_tokenizer(pre: str | None) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM's tokenizer.json (and llama.cpp's "smollm" pre-type) split every digit on its own first.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre not in (None, "default", "gpt2", "gpt-2"):
        warnings.warn(f"unknown GGUF pre-tokenizer {pre!r}: using GPT-2's split rule", stacklevel=3)
    return byte_level


def tokenizer_from_gguf(reader: Any, source: str) -> Any:
    """Byte-level BPE tokenizer + special tokens + chat template from the GGUF metadata."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    from llmlab.tokenizer import Tokenizer

    kind = _field(reader, "tokenizer.ggml.model", None, source)
    if kind != "gpt2":
        raise CheckpointError(
            f"{source}: GGUF 'tokenizer.ggml.model' = {kind!r}: only byte-level BPE ('gpt2') tokenizers are supported"
        )
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens", source=source))
    # A vocabulary of bytes and specials only has no merges, and writers then omit the (empty) key.
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [], source)]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens), source))
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet already; respell any that are not (as transformers does).
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", None, source))
    backend.decoder = decoders.ByteLevel()
    # Control tokens (type 3) stay whole and are special; user-defined ones (type 4) stay whole too.
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types)
            if k == 3 and set(t) <= alphabet
        ]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    )

    def token(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}", None, source)
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    extra = [t for t in (token("eot_token_id"), token("eom_token_id")) if t is not None]
    eos = token("eos_token_id")
    return Tokenizer(
        backend=backend,
        bos_token=token("bos_token_id"),
        eos_token=eos,
        pad_token=token("padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template", None, source),
        extra_stop_tokens=[t for t in dict.fromkeys(extra) if t != eos],
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False, source)),
    )


def load_gguf(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """Load a ``.gguf`` file -> ``(Transformer, Tokenizer or None)`` (None when the file has no vocabulary)."""
    from llmlab.interop.build import build_model

    source = str(path)
    reader = open_gguf(path)
    cfg = config_from_gguf(reader, source)
    state = state_from_gguf(reader, cfg, source)
    model = build_model(cfg, state, source, device=device, dtype=dtype)
    tokenizer = tokenizer_from_gguf(reader, source) if "tokenizer.ggml.tokens" in reader.fields else None
    return model, tokenizer
