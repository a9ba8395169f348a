"""Quantizing a whole Transformer: config, calibration, the layer-by-layer pass, and the checkpoint format.

``quantize_model(model, cfg, tokenizer)`` replaces the ``nn.Linear`` layers of every block (q/k/v/o,
gate/up/down; the output head only with ``include_head``) by frozen quantized linears:

- round-to-nearest (default): each weight on its own, no data needed;
- ``awq`` and/or ``gptq``: calibration text is run through the model block by block. For each block the
  inputs it receives from the already-quantized blocks before it are captured, AWQ scales are searched and
  folded (float model unchanged), the Hessians of each linear's inputs are collected, the linears are
  quantized (GPTQ or round-to-nearest) and the quantized block's outputs become the next block's inputs.

Checkpoint: an llmlab checkpoint directory whose ``config.json`` carries a ``"quantization"`` key and whose
``model.safetensors`` holds the codes/scales buffers; :func:`load_quantized` reads it back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.errors import CheckpointError, ConfigError
from llmlab.quant.common import QuantLinear, check_group_size
from llmlab.quant.config import (  # re-exported: callers import the config from here too
    QUANT_PRESETS,
    SCHEMES,
    QuantConfig,
    check_shapes,
    resolve_group_size,
    target_names,
)

QUANT_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ modules
def make_quant_linear(
    weight: Tensor, bias: Tensor | None, cfg: QuantConfig, name: str = "weight"
) -> QuantLinear:
    """Round-to-nearest quantized linear of a float weight under ``cfg``."""
    from llmlab.quant.int4 import Int4Linear
    from llmlab.quant.int8 import Int8Linear
    from llmlab.quant.nf4 import NF4Linear

    if cfg.scheme == "int8":
        return Int8Linear.from_weight(weight, bias)
    if cfg.scheme == "int4":
        check_group_size(weight.shape[1], cfg.group_size, name)
        return Int4Linear.from_weight(weight, bias, cfg.group_size, cfg.symmetric, cfg.float_zero)
    return NF4Linear.from_weight(weight, bias, cfg.group_size, cfg.double_quant)


def fake_quantize(weight: Tensor, cfg: QuantConfig) -> Tensor:
    """Round-to-nearest quantize then dequantize (what :func:`make_quant_linear` stores, as a float weight)."""
    from llmlab.quant.int4 import dequantize_int4, quantize_int4
    from llmlab.quant.int8 import dequantize_int8, quantize_int8
    from llmlab.quant.nf4 import dequantize_nf4, quantize_nf4

    if cfg.scheme == "int8":
        return dequantize_int8(*quantize_int8(weight))
    if cfg.scheme == "int4":
        return dequantize_int4(*quantize_int4(weight, cfg.group_size, cfg.symmetric, cfg.float_zero))
    return dequantize_nf4(quantize_nf4(weight, cfg.group_size, cfg.double_quant))


def empty_quant_linear(in_features: int, out_features: int, bias: bool, cfg: QuantConfig) -> QuantLinear:
    """A quantized linear of the right shapes to load a state dict into."""
    from llmlab.quant.int4 import Int4Linear
    from llmlab.quant.int8 import Int8Linear
    from llmlab.quant.nf4 import NF4Linear

    if cfg.scheme == "int8":
        return Int8Linear(in_features, out_features, bias)
    if cfg.scheme == "int4":
        return Int4Linear(in_features, out_features, bias, cfg.group_size, cfg.symmetric, cfg.float_zero)
    return NF4Linear(in_features, out_features, bias, cfg.group_size, cfg.double_quant)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


# -------------------------------------------------------------------------------------- calibration
def calibration_tokens(tokenizer: Any, cfg: QuantConfig) -> Tensor:
    """``[calib_samples, calib_seq_len]`` token windows drawn at random (seeded) from the calibration text."""
    from llmlab.data.corpora import read_text

    text = read_text(cfg.calib_data)
    # Tokenize only as much text as needed (about 5 characters per token is generous for English BPE).
    need = cfg.calib_samples * cfg.calib_seq_len
    ids = tokenizer.encode(text[: max(need * 8, 200_000)])
    if len(ids) <= cfg.calib_seq_len:
        raise ConfigError(f"calibration text '{cfg.calib_data}' has only {len(ids)} tokens")
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, len(ids) - cfg.calib_seq_len, (cfg.calib_samples,), generator=gen)
    all_ids = torch.tensor(ids, dtype=torch.long)
    return torch.stack([all_ids[s : s + cfg.calib_seq_len] for s in starts.tolist()])


class _Stop(Exception):
    """Raised by a hook to stop the forward pass once the first block's inputs are captured."""


@torch.no_grad()
def _first_block_inputs(model: nn.Module, tokens: Tensor, chunk: int) -> list[tuple[Tensor, Any, Any]]:
    """Run embeddings for each chunk of calibration rows and capture what block 0 receives."""
    captured: list[tuple[Tensor, Any, Any]] = []

    def hook(_module, args):
        x, rope, meta = args[0], args[1], args[2]
        captured.append((x.detach(), rope, meta))
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(hook)
    try:
        for i in range(0, tokens.shape[0], chunk):
            try:
                model(tokens[i : i + chunk])
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _group_linears(block: nn.Module) -> list[tuple[nn.Module | None, list[str]]]:
    """(op that produces the input, names of the linears sharing that input) per block, for AWQ folding."""
    attn, mlp = block.self_attn, block.mlp
    groups: list[tuple[nn.Module | None, list[str]]] = [
        (block.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ]
    # o_proj's input channels are v_proj's output channels only when every query head has its own value head.
    groups.append((attn.v_proj if attn.n_kv_heads == attn.n_heads else None, ["self_attn.o_proj"]))
    up = ["mlp.gate_proj", "mlp.up_proj"] if mlp.gated else ["mlp.up_proj"]
    groups.append((block.post_attention_layernorm, up))
    # down_proj's input is act(gate) * up: scaling up_proj's rows scales it linearly (not so without a gate).
    groups.append((mlp.up_proj if mlp.gated else None, ["mlp.down_proj"]))
    return groups


@torch.no_grad()
def _collect_inputs(block: nn.Module, names: list[str], xs, fn) -> None:
    """Run the block on every calibration chunk, calling ``fn(name, input)`` for each listed linear."""
    handles = []
    for name in names:
        handles.append(block.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: fn(n, a[0])))
    try:
        for x, rope, meta in xs:
            block(x, rope, meta, None)
    finally:
        for h in handles:
            h.remove()


def _awq_block(block: nn.Module, xs, cfg: QuantConfig) -> dict[str, float]:
    from llmlab.quant.awq import fold_scale, search_scale

    groups = [(prev, names) for prev, names in _group_linears(block) if prev is not None]
    inputs: dict[str, list[Tensor]] = {names[0]: [] for _, names in groups}
    budget = {k: cfg.awq_max_tokens for k in inputs}

    def keep(name: str, x: Tensor) -> None:
        if name in inputs and budget[name] > 0:
            flat = x.reshape(-1, x.shape[-1])[: budget[name]]
            inputs[name].append(flat.float())
            budget[name] -= flat.shape[0]

    _collect_inputs(block, list(inputs), xs, keep)

    def qdq(w: Tensor) -> Tensor:
        return fake_quantize(w, cfg)

    gains = {}
    for prev, names in groups:
        x = torch.cat(inputs[names[0]])
        linears = [block.get_submodule(n) for n in names]
        scale, err, base = search_scale(x, [lin.weight for lin in linears], qdq, cfg.awq_grid)
        fold_scale(prev, linears, scale)
        gains[names[0]] = err / base if base > 0 else 1.0
    return gains


def _quantize_block(block: nn.Module, xs, cfg: QuantConfig) -> None:
    from llmlab.quant.gptq import HessianAccumulator, gptq_quantize
    from llmlab.quant.int4 import Int4Linear, int4_quantizer
    from llmlab.quant.int8 import Int8Linear, int8_quantizer

    names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    if not cfg.gptq:
        for name in names:
            lin = block.get_submodule(name)
            _set_module(block, name, make_quant_linear(lin.weight, lin.bias, cfg, name))
        return
    acc = {n: HessianAccumulator(block.get_submodule(n).in_features) for n in names}
    _collect_inputs(block, names, xs, lambda n, x: acc[n].add(x))
    for name in names:
        lin = block.get_submodule(name)
        bias = lin.bias.detach() if lin.bias is not None else None
        if cfg.scheme == "int4":
            quantizer = int4_quantizer(cfg.group_size, cfg.symmetric, cfg.float_zero)
        else:
            quantizer = int8_quantizer(lin.in_features)
        codes, scales, zeros = gptq_quantize(
            lin.weight,
            acc[name].hessian(),
            quantizer,
            cfg.gptq_block_size,
            cfg.gptq_damp,
            cfg.act_order,
        )
        if cfg.scheme == "int4":
            module = Int4Linear.from_codes(codes, scales, zeros, bias, cfg.symmetric, cfg.float_zero)
        else:
            module = Int8Linear.from_codes(codes, scales[:, 0], bias)
        _set_module(block, name, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    cfg: QuantConfig,
    tokenizer: Any | None = None,
    calib_tokens: Tensor | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize ``model`` in place (float32 weights expected). Returns a small report dict.

    ``calib_tokens [n, T]`` overrides the calibration text (needed for GPTQ/AWQ, else drawn from
    ``cfg.calib_data`` with ``tokenizer``).
    """
    from tqdm import tqdm

    cfg.validate()
    note = resolve_group_size(model, cfg)
    check_shapes(model, cfg)
    model.eval()
    t0 = time.perf_counter()
    report: dict[str, Any] = {"scheme": cfg.scheme, "group_size": cfg.group_size}
    if note:
        report["group_size_note"] = note
    if (cfg.gptq or cfg.awq) and getattr(getattr(model, "cfg", None), "ffn", None) == "moe":
        # Their per-block calibration knows dense MLPs only; round-to-nearest still covers the router/shared
        # expert linears (the experts' 3-D weights stay float).
        raise ConfigError("GPTQ/AWQ do not support ffn='moe' models yet: quantize without --gptq/--awq")
    if cfg.gptq or cfg.awq:
        if calib_tokens is None:
            if tokenizer is None:
                raise ConfigError(
                    "GPTQ/AWQ need calibration text: pass a tokenizer (the checkpoint has none)"
                )
            calib_tokens = calibration_tokens(tokenizer, cfg)
        xs = _first_block_inputs(model, calib_tokens, chunk=8)
        awq_gains = []
        layers = tqdm(model.layers, desc=f"quantize {cfg.scheme}", unit="layer", disable=not progress)
        for block in layers:
            if cfg.awq:
                awq_gains.append(_awq_block(block, xs, cfg))
            _quantize_block(block, xs, cfg)
            xs = [(block(x, rope, meta, None), rope, meta) for x, rope, meta in xs]
        if awq_gains:
            ratios = [r for g in awq_gains for r in g.values()]
            report["awq_error_ratio_mean"] = sum(ratios) / len(ratios)
        report["calib_tokens"] = int(calib_tokens.numel())
    else:
        for block in model.layers:
            _quantize_block(block, [], cfg)
    if cfg.include_head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        head = model.lm_head
        model.lm_head = make_quant_linear(head.weight, head.bias, cfg, "lm_head")
    model.requires_grad_(False)
    report["seconds"] = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------------------- memory
def model_bytes(model: nn.Module) -> int:
    """Bytes of everything the checkpoint stores (parameters + persistent buffers)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the (quantized or float) linear layers of the blocks."""
    total = 0
    for _, m in model.named_modules():
        if isinstance(m, QuantLinear):
            total += m.weight_bytes()
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


# ------------------------------------------------------------------------------------- checkpoint
def save_quantized(directory: str | Path, model: nn.Module, tokenizer: Any | None, cfg: QuantConfig) -> Path:
    """Write a quantized llmlab checkpoint (atomic)."""
    from llmlab.model.checkpoint import save_checkpoint

    modules = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not modules:
        raise ConfigError("model has no quantized layers: run quantize_model first")
    meta = {"format_version": QUANT_FORMAT_VERSION, **cfg.to_dict(), "modules": modules}
    return save_checkpoint(directory, model, tokenizer, extra_config={"quantization": meta})


def load_quantized(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Read a directory written by :func:`save_quantized` -> ``(model, tokenizer or None)``."""
    from llmlab.config import from_dict
    from llmlab.model.checkpoint import (
        CONFIG_FILE,
        WEIGHTS_FILE,
        _rebuild_buffers,
        load_into,
        load_state_dict,
        read_config,
    )
    from llmlab.model.config import ModelConfig
    from llmlab.model.transformer import Transformer
    from llmlab.tokenizer import TOKENIZER_FILE, Tokenizer

    directory = Path(directory)
    config = read_config(directory)
    source = str(directory / CONFIG_FILE)
    meta = config.get("quantization")
    if not isinstance(meta, dict) or "model" not in config:
        raise CheckpointError(f"{source}: not a quantized llmlab checkpoint (no 'quantization'/'model' keys)")
    meta = dict(meta)
    version = meta.pop("format_version", None)
    if version != QUANT_FORMAT_VERSION:
        raise CheckpointError(f"{source}: unsupported quantization format_version {version!r}")
    modules = meta.pop("modules", None)
    if not isinstance(modules, list) or not modules:
        raise CheckpointError(f"{source}: 'quantization.modules' must list the quantized layers")
    try:
        qcfg = from_dict(QuantConfig, meta, prefix="quantization.")
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    cfg = ModelConfig.from_dict(config["model"], source=source)
    with torch.device("meta"):
        model = Transformer(cfg)
        for name in modules:
            try:
                lin = model.get_submodule(name)
            except AttributeError as exc:
                raise CheckpointError(
                    f"{source}: quantized layer '{name}' does not exist in the model"
                ) from exc
            if not isinstance(lin, nn.Linear):
                raise CheckpointError(f"{source}: quantized layer '{name}' is not a linear layer")
            _set_module(
                model, name, empty_quant_linear(lin.in_features, lin.out_features, lin.bias is not None, qcfg)
            )
    model = model.to_empty(device=device)
    load_into(model, load_state_dict(directory / WEIGHTS_FILE), str(directory / WEIGHTS_FILE))
    _rebuild_buffers(model)
    model.requires_grad_(False)
    model.eval()
    tokenizer = Tokenizer.from_file(directory) if (directory / TOKENIZER_FILE).is_file() else None
    return model, tokenizer


__all__ = [
    "QUANT_FORMAT_VERSION", "QUANT_PRESETS", "SCHEMES", "QuantConfig", "check_shapes", "empty_quant_linear",
    "fake_quantize", "linear_bytes", "load_quantized", "make_quant_linear", "model_bytes", "quantize_model",
    "resolve_group_size", "save_quantized", "target_names",
]  # fmt: skip
