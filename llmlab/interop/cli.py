"""``llmlab convert SRC DST --to llmlab|hf``: between llmlab checkpoints, HF directories and GGUF files.

Import-light: torch and the converters load inside the handler.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint (llmlab dir, HF dir or .gguf) to an llmlab or HF directory",
        description=(
            "Load SRC (an llmlab checkpoint dir, a Hugging Face model dir, or a .gguf file; GGUF weights are "
            "dequantized) and write it to DST as an llmlab checkpoint or a Hugging Face directory that "
            "transformers' AutoModelForCausalLM.from_pretrained loads. DST is written atomically: a failed "
            "conversion leaves any existing DST untouched."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="llmlab checkpoint dir, Hugging Face model dir, or .gguf file")
    p.add_argument("dst", metavar="DST", help="output directory (replaced atomically if it exists)")
    p.add_argument("--to", choices=["llmlab", "hf"], default="llmlab", help="output format")
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
    start = time.perf_counter()
    model, tokenizer = load(src, dtype=dtype)
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
