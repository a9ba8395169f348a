"""``llmlab quantize SRC DST``: post-training weight-only quantization of a checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from llmlab.cliargs import add_override_arguments, overrides_from
from llmlab.outputs import add_output_argument


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="quantize a model's linear layers to int8 / int4 / NF4 (optionally GPTQ, AWQ)",
        description=(
            "Post-training weight-only quantization. SRC is any model llmlab.load reads (llmlab checkpoint, HF "
            "directory, .gguf); DST is written as a quantized llmlab checkpoint that llmlab.load reads back. "
            "Settings: --preset, then --config YAML, then key=value overrides (or --set key=value), then the flags below."
        ),
    )
    p.add_argument("src", metavar="SRC", help="model to quantize")
    add_output_argument(p, "output checkpoint directory", dest="dst", positional=True)
    p.add_argument("--scheme", choices=["int8", "int4", "nf4"], default=None, help="quantization scheme")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="int4 group (32/64/128/256; default: the largest of 128/64/32 that divides every layer) or "
        "NF4 block (default 64)",
    )
    p.add_argument("--symmetric", action="store_true", default=None, help="int4: symmetric (no zero point)")
    p.add_argument(
        "--float-zero",
        action="store_true",
        default=None,
        help="int4: fp16 group minimum as offset instead of an integer zero point (Q4_1-style)",
    )
    p.add_argument("--gptq", action="store_true", default=None, help="GPTQ error compensation (int8/int4)")
    p.add_argument(
        "--act-order", action="store_true", default=None, help="GPTQ: quantize large-activation columns first"
    )
    p.add_argument("--awq", action="store_true", default=None, help="AWQ activation-aware channel scaling")
    p.add_argument(
        "--include-head", action="store_true", default=None, help="also quantize an untied lm_head"
    )
    p.add_argument(
        "--calib-samples", type=int, default=None, help="calibration windows for GPTQ/AWQ (default 32)"
    )
    p.add_argument(
        "--calib-seq-len", type=int, default=None, help="tokens per calibration window (default 256)"
    )
    p.add_argument(
        "--calib-data", default=None, help="calibration corpus name or text file (default wikitext2-valid)"
    )
    p.add_argument("--preset", default=None, help="named settings: int8, int4, int4-gptq, int4-awq, nf4")
    p.add_argument("--config", default=None, metavar="YAML", help="YAML file of QuantConfig keys")
    add_override_arguments(p, "QuantConfig overrides key=value, e.g. group_size=64")
    p.set_defaults(func=run_quantize)


_FLAG_KEYS = {
    "scheme": "scheme",
    "group_size": "group_size",
    "symmetric": "symmetric",
    "float_zero": "float_zero",
    "gptq": "gptq",
    "act_order": "act_order",
    "awq": "awq",
    "include_head": "include_head",
    "calib_samples": "calib_samples",
    "calib_seq_len": "calib_seq_len",
    "calib_data": "calib_data",
}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmlab.config import build_config
    from llmlab.errors import ConfigError
    from llmlab.loading import load as load_model
    from llmlab.quant.quantize import (
        QUANT_PRESETS,
        QuantConfig,
        check_shapes,
        linear_bytes,
        model_bytes,
        quantize_model,
        resolve_group_size,
        save_quantized,
    )

    overrides = overrides_from(args)
    overrides += [
        f"{key}={getattr(args, flag)}" for flag, key in _FLAG_KEYS.items() if getattr(args, flag) is not None
    ]
    cfg = build_config(QuantConfig, QUANT_PRESETS, args.preset, args.config, overrides)
    if Path(args.dst).resolve() == Path(args.src).resolve():
        raise ConfigError("DST must differ from SRC (the source checkpoint is never overwritten)")
    model, tokenizer = load_model(args.src)
    if not hasattr(model, "layers"):
        raise ConfigError(f"{args.src}: not an llmlab Transformer (already quantized?)")
    model = model.float()
    cfg.validate()
    note = resolve_group_size(model, cfg)
    if note:
        print(note)
    check_shapes(model, cfg)
    before_all, before_lin = model_bytes(model), linear_bytes(model)
    report = quantize_model(model, cfg, tokenizer)
    after_all, after_lin = model_bytes(model), linear_bytes(model)
    save_quantized(args.dst, model, tokenizer, cfg)
    extra = []
    if cfg.gptq:
        extra.append("GPTQ")
    if cfg.awq:
        extra.append(f"AWQ (mean output-error ratio {report.get('awq_error_ratio_mean', 1.0):.3f})")
    group = f", group {cfg.group_size}" if cfg.scheme != "int8" else ""
    print(
        f"quantized {args.src} -> {args.dst}: {cfg.scheme}{group}{' + ' + ' + '.join(extra) if extra else ''}"
    )
    print(
        f"  linear layers: {_mib(before_lin)} -> {_mib(after_lin)} ({before_lin / max(after_lin, 1):.2f}x smaller)"
    )
    print(
        f"  whole model:   {_mib(before_all)} -> {_mib(after_all)} ({before_all / max(after_all, 1):.2f}x smaller)"
    )
    print(f"  took {report['seconds']:.1f} s")
    return 0
