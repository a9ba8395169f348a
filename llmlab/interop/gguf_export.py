"""Write GGUF files (llama.cpp's format): the inverse of :mod:`llmlab.interop.gguf`, through the ``gguf`` package.

What a reader (llama.cpp, Ollama, transformers' GGUF loader, :func:`llmlab.interop.gguf.load_gguf`) needs:

- **metadata**: the llama-family keys ``{arch}.block_count``, ``embedding_length``, ``feed_forward_length``,
  ``attention.head_count(_kv)``, ``rope.freq_base``, ``rope.dimension_count``, ``attention.layer_norm_rms_epsilon``
  (and the RoPE scaling keys), ``general.file_type``. ``arch`` is ``llama``, or ``qwen2`` for a model with
  q/k/v biases only. Anything these keys cannot describe (learned or ALiBi positions, LayerNorm, GELU MLPs,
  sliding windows, other biases, llama3/dynamic RoPE scaling) is refused by name;
- **tensors**: ``blk.N.attn_q.weight`` ... Norms and biases stay F32; 2-D weights take the requested type
  (F32, F16, BF16, or a block type quantized by ``gguf.quants.quantize``). For ``llama`` the rows of
  ``attn_q``/``attn_k`` are permuted as llama.cpp's converter does (its RoPE rotates interleaved pairs, ours
  rotates halves); the reader undoes it. A weight whose rows do not split into whole blocks falls back to
  F16, and with a 4/5-bit type the output head stays Q8_0 (llama-quantize keeps it at 6 bits, Q6_K, which the
  ``gguf`` package cannot write);
- **tokenizer**: byte-level BPE as ``tokenizer.ggml.model = "gpt2"``: the tokens in id order (padded with
  unused ``[PADn]`` up to the model's vocabulary), merges, token types (control = special, user-defined =
  other added tokens), the llama.cpp pre-tokenizer name of our split rule, bos/eos/pad/eot ids,
  ``add_bos_token`` and the chat template.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmlab.errors import ConfigError
from llmlab.interop.gguf import _BLOCK_NAMES, _GLOBAL_NAMES, _LLAMA3_SPLIT, _QWEN2_SPLIT
from llmlab.model.config import ModelConfig

# Types llmlab writes (all of which llmlab, llama.cpp and transformers read back).
EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
DEFAULT_TYPE = "f16"
_LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")  # the output head stays Q8_0 with these
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5
_TO_GGUF = {v: k for k, v in _GLOBAL_NAMES.items()} | {v: k for k, v in _BLOCK_NAMES.items()}


def export_type(name: str) -> Any:
    """``"q8_0"`` -> ``GGMLQuantizationType.Q8_0``; ConfigError naming the type if llmlab cannot write it."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    key = str(name).strip().lower()
    if key in EXPORT_TYPES:
        return Q[key.upper()]
    if key.upper() not in Q.__members__:
        raise ConfigError(
            f"--type {name!r}: not a GGUF tensor type (llmlab writes {', '.join(EXPORT_TYPES)})"
        )
    qtype = Q[key.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block), np.float32), qtype)
    except NotImplementedError:
        raise ConfigError(
            f"--type {name!r}: the gguf package ({_gguf_version()}) cannot write {qtype.name} tensors "
            f"(llmlab writes {', '.join(EXPORT_TYPES)})"
        ) from None
    raise ConfigError(
        f"--type {name!r}: llmlab does not write {qtype.name} (it cannot read it back); "
        f"choose one of {', '.join(EXPORT_TYPES)}"
    )


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown version"


def gguf_arch(cfg: ModelConfig, source: str = "model") -> str:
    """The GGUF architecture that describes ``cfg`` (``llama`` or ``qwen2``), or ConfigError naming the key."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(
                f"{source}: cannot export to GGUF: {what}; the llama-family GGUF keys (llama, qwen2) "
                "describe rotary positions, RMSNorm and a SwiGLU MLP only"
            )

    need(
        cfg.position == "rope", f"position={cfg.position!r} (learned/ALiBi positions have no GGUF llama key)"
    )
    need(cfg.norm == "rmsnorm", f"norm={cfg.norm!r}")
    need(cfg.ffn == "swiglu" and cfg.activation == "silu", f"ffn={cfg.ffn!r}, activation={cfg.activation!r}")
    need(cfg.sliding_window is None, f"sliding_window={cfg.sliding_window}")
    need(not cfg.qk_norm, "qk_norm (Qwen3's q_norm/k_norm have no llama/qwen2 GGUF tensor)")
    need(not cfg.mlp_bias and not cfg.out_bias, "mlp_bias/out_bias (only q/k/v biases, as qwen2)")
    rs = cfg.rope_scaling
    need(rs.type in ("none", "linear", "yarn"), f"rope_scaling.type={rs.type!r} (GGUF keys: linear, yarn)")
    if rs.type == "yarn":
        need(
            (rs.beta_fast, rs.beta_slow, rs.attention_factor, rs.mscale, rs.mscale_all_dim)
            == (32.0, 1.0, None, None, None),
            "yarn rope_scaling with non-default beta/attention factors",
        )
    return "qwen2" if cfg.qkv_bias else "llama"


def permute_qk(w: Tensor, n_head: int) -> Tensor:
    """llama.cpp's ``permute`` of q/k rows: HF's half-split RoPE layout -> interleaved pairs (see gguf.py)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------- tokenizer
def _byte_level(spec: dict | None, use_regex: bool) -> bool:
    return (
        isinstance(spec, dict)
        and spec.get("type") == "ByteLevel"
        and bool(spec.get("use_regex", True)) == use_regex
        and not spec.get("add_prefix_space", False)
    )


def pre_tokenizer_name(spec: dict | None, source: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a ``tokenizer.json`` pre-tokenizer (the reader's inverse)."""
    if _byte_level(spec, True):
        return "gpt-2"
    items = spec.get("pretokenizers", []) if isinstance(spec, dict) and spec.get("type") == "Sequence" else []
    if len(items) == 2:
        first, second = items
        if first.get("type") == "Digits" and first.get("individual_digits") and _byte_level(second, True):
            return "smollm"
        if first.get("type") == "Split" and _byte_level(second, False):
            pattern = (first.get("pattern") or {}).get("Regex")
            for name, split in (("llama-bpe", _LLAMA3_SPLIT), ("qwen2", _QWEN2_SPLIT)):
                if pattern == split:
                    return name
    raise ConfigError(
        f"{source}: tokenizer pre-tokenizer {json.dumps(spec)[:160]} has no llama.cpp name "
        "(known: GPT-2 byte-level, SmolLM digits, llama3 and qwen2 splits); GGUF readers would split text differently"
    )


def tokenizer_metadata(tokenizer: Any, vocab_size: int, source: str = "tokenizer") -> dict[str, Any]:
    """Tokens, merges, token types, pre-tokenizer and special ids of a byte-level BPE :class:`Tokenizer`."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConfigError(
            f"{source}: only byte-level BPE tokenizers can be written to GGUF "
            f"(model {model.get('type')!r}, decoder {(spec.get('decoder') or {}).get('type')!r})"
        )
    if spec.get("normalizer") is not None:
        raise ConfigError(
            f"{source}: a tokenizer normalizer ({spec['normalizer'].get('type')}) has no GGUF key"
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ConfigError(f"{source}: token ids are not contiguous 0..{len(vocab) - 1}")
    if len(vocab) > vocab_size:
        raise ConfigError(f"{source}: {len(vocab)} tokens but the model's vocab_size is {vocab_size}")
    tokens = [""] * len(vocab)
    for token, idx in vocab.items():
        tokens[idx] = token
    added = {t.content: t for t in tokenizer.backend.get_added_tokens_decoder().values()}
    types = [
        (_TOKEN_CONTROL if added[t].special else _TOKEN_USER_DEFINED) if t in added else _TOKEN_NORMAL
        for t in tokens
    ]
    pad = [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]  # as llama.cpp's converter pads
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    stops = [tokenizer.token_to_id(t) for t in tokenizer.extra_stop_tokens]
    return {
        "pre": pre_tokenizer_name(spec.get("pre_tokenizer"), source),
        "tokens": tokens + pad,
        "types": types + [_TOKEN_UNUSED] * len(pad),
        "merges": merges,
        "bos": tokenizer.bos_id,
        "eos": tokenizer.eos_id,
        "pad": tokenizer.token_to_id(tokenizer.pad_token) if tokenizer.pad_token else None,
        "eot": next((i for i in stops if i is not None and i != tokenizer.eos_id), None),
        "add_bos": bool(tokenizer.add_bos),
        "chat_template": tokenizer.chat_template,
    }


def _add_tokenizer(writer: Any, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
        ("eot", writer.add_eot_token_id),
    ):
        if meta[key] is not None:
            add(int(meta[key]))
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(False)
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


# ------------------------------------------------------------------------------------------------ tensors
def _add_config(writer: Any, cfg: ModelConfig, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    if cfg.dim_head != cfg.d_model // cfg.n_heads:
        writer.add_key_length(cfg.dim_head)
        writer.add_value_length(cfg.dim_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.dim_head)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    rs = cfg.rope_scaling
    if rs.type in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rs.type))
        writer.add_rope_scaling_factor(rs.factor)
        if rs.type == "yarn":
            writer.add_rope_scaling_orig_ctx_len(rs.original_max_seq_len or cfg.max_seq_len)


def gguf_tensor_name(name: str) -> str:
    """``layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; ``embed_tokens.weight`` -> ``token_embd.weight``."""
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        module, suffix = rest.rsplit(".", 1)
        return f"blk.{layer}.{_TO_GGUF[module]}.{suffix}"
    module, suffix = name.rsplit(".", 1)
    return f"{_TO_GGUF[module]}.{suffix}"


def _tensor_type(gname: str, array: np.ndarray, qtype: Any, tied: bool) -> Any:
    import gguf
    from gguf import GGMLQuantizationType as Q

    if array.ndim == 1 or qtype == Q.F32:
        return Q.F32
    head = gname == "output.weight" or (tied and gname == "token_embd.weight")
    if head and qtype.name.lower() in _LOW_BIT:
        qtype = Q.Q8_0
    if array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return Q.F16  # as llama.cpp's converter: rows that are not whole blocks stay F16
    return qtype


def save_gguf(
    path: str | Path,
    model: Any,
    tokenizer: Any | None = None,
    qtype: str = DEFAULT_TYPE,
    name: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` (a float :class:`Transformer`) and ``tokenizer`` as one GGUF file, atomically.

    Returns ``{"types": {type: tensor count}, "bytes": file size, "arch", "seconds"}``.
    """
    import gguf

    from llmlab.model.checkpoint import atomic_write_file

    start = time.perf_counter()
    path = Path(path)
    cfg: ModelConfig = model.cfg
    target = export_type(qtype)
    arch = gguf_arch(cfg, str(path))
    if any(not p.is_floating_point() for p in model.state_dict().values()):
        raise ConfigError(
            f"{path}: the model holds quantized layers: dequantize it first (llmlab convert does)"
        )
    meta = tokenizer_metadata(tokenizer, cfg.vocab_size) if tokenizer is not None else None
    state = {
        k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")
    }
    counts: Counter[str] = Counter()
    file_type = getattr(gguf.LlamaFileType, "ALL_F32" if target.name == "F32" else f"MOSTLY_{target.name}")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _add_config(writer, cfg, name or path.stem)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if meta is not None:
            _add_tokenizer(writer, meta)
        for key, value in state.items():
            gname = gguf_tensor_name(key)
            weight = value.detach().float().cpu()
            if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
                weight = permute_qk(weight, cfg.n_heads if "attn_q" in gname else cfg.kv_heads)
            array = np.ascontiguousarray(weight.numpy())
            kind = _tensor_type(gname, array, target, cfg.tie_embeddings)
            counts[kind.name] += 1
            if kind.name in ("F32", "F16"):
                writer.add_tensor(gname, gguf.quants.quantize(array, kind))
            else:
                writer.add_tensor(gname, gguf.quants.quantize(array, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    with torch.no_grad():
        atomic_write_file(path, write)
    return {
        "arch": arch,
        "types": dict(counts),
        "bytes": path.stat().st_size,
        "seconds": time.perf_counter() - start,
    }


__all__ = ["EXPORT_TYPES", "export_type", "gguf_arch", "gguf_tensor_name", "save_gguf", "tokenizer_metadata"]
