"""``llmlab convert SRC DST --to llmlab|hf|gguf``: between llmlab checkpoints, HF directories and GGUF files.

Import-light: torch and the converters load inside the handler.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from llmlab.outputs import add_output_argument


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint (llmlab dir, HF dir or .gguf) to an llmlab or HF directory or a .gguf file",
        description=(
            "Load SRC (an llmlab checkpoint dir, a quantized one, a Hugging Face model dir, or a .gguf file; "
            "GGUF and quantized weights are dequantized) and write it to DST as an llmlab checkpoint, a Hugging "
            "Face directory that transformers' AutoModelForCausalLM.from_pretrained loads, or (--to gguf) one "
            "GGUF file that llama.cpp, Ollama and transformers read, its 2-D weights in --type. DST is written "
            "atomically: a failed conversion leaves any existing DST untouched."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="llmlab checkpoint dir, Hugging Face model dir, or .gguf file")
    add_output_argument(
        p,
        "output directory or .gguf file (an existing one only with --overwrite)",
        dest="dst",
        positional=True,
    )
    p.add_argument(
        "--to",
        choices=["llmlab", "hf", "gguf"],
        default=None,
        help="output format (unset: gguf when DST ends in .gguf, else llmlab)",
    )
    p.add_argument(
        "--type",
        default=None,
        metavar="TYPE",
        help="with --to gguf: tensor type of the 2-D weights: f32, f16 (default), bf16, q8_0, q4_0, q4_1, q5_0, "
        "q5_1 (norms stay f32; with 4/5-bit types the output head is q8_0)",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="weight dtype to write",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="with --to hf: largest safetensors shard (e.g. 5GB, 500MB); bigger models are sharded with an index",
    )
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmlab.errors import CheckpointError
    from llmlab.loading import load, parse_dtype

    src, dst = Path(args.src), Path(args.dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: DST must differ from SRC")
    dtype = parse_dtype(args.dtype)
    if args.to is None:
        args.to = "gguf" if dst.suffix.lower() == ".gguf" else "llmlab"
    if args.to == "gguf":
        from llmlab.interop.gguf_export import DEFAULT_TYPE, export_type

        args.type = args.type or DEFAULT_TYPE
        export_type(args.type)  # fail on a type we cannot write before any work
    elif args.type is not None:
        raise CheckpointError(
            f"--type {args.type} applies to --to gguf only (use --dtype for --to {args.to})"
        )
    start = time.perf_counter()
    model, tokenizer = load(src, dtype=None if args.to == "gguf" else dtype)
    _dequantize_for_export(model, src, args.to, dtype)
    if args.to == "gguf":
        from llmlab.interop.gguf_export import save_gguf

        report = save_gguf(dst, model, tokenizer, args.type)
        types = ", ".join(f"{n} {k}" for k, n in sorted(report["types"].items()))
        print(
            f"converted {src} -> {dst} (gguf, arch {report['arch']}, tensors: {types}, "
            f"{report['bytes'] / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f}s",
            file=sys.stderr,
        )
        return 0
    if args.to == "hf":
        from llmlab.interop.hf import parse_size, save_hf

        parse_size(args.max_shard_size)  # fail on a bad size before any work is written
        save_hf(dst, model, tokenizer, max_shard_size=args.max_shard_size)
    else:
        from llmlab.model.checkpoint import save_checkpoint

        save_checkpoint(dst, model, tokenizer, extra_config={"converted_from": str(src)})
    n = sum(p.numel() for p in model.parameters())
    print(
        f"converted {src} -> {dst} ({args.to}, {n / 1e6:.1f}M parameters, "
        f"tokenizer: {'yes' if tokenizer is not None else 'no'}) in {time.perf_counter() - start:.1f}s",
        file=sys.stderr,
    )
    return 0


def _dequantize_for_export(model: Any, src: Any, to: str, dtype: Any) -> None:
    """A quantized checkpoint is written with float weights: HF, GGUF and plain llmlab checkpoints have no
    slot for llmlab's int8/int4/NF4 codes (writing them raw gave transformers random projections)."""
    import torch

    from llmlab.quant.common import dequantize_model, quantized_layers

    kinds = sorted({type(m).__name__ for m in quantized_layers(model).values()})
    if not kinds:
        return
    target = torch.float32 if to == "gguf" else (dtype or torch.float32)  # GGUF quantizes from fp32
    names = dequantize_model(model, target)
    model.to(target)
    print(
        f"note: {src} is quantized ({', '.join(kinds)}): writing its {len(names)} quantized layers "
        f"dequantized to {str(target).removeprefix('torch.')} for --to {to}",
        file=sys.stderr,
    )
