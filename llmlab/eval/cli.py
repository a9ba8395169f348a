"""``llmlab eval``: a command group of evaluations; ``llmlab eval ppl`` is perplexity / bits per byte.

To add an evaluation, write a function ``register_eval(subparsers)`` that adds one sub-command (with
``set_defaults(func=handler)``) and list its module in :data:`EVAL_MODULES`. Keep module imports light:
import torch and friends inside the handler.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

# Modules with a ``register_eval(subparsers)`` function, in the order ``llmlab eval --help`` lists them.
EVAL_MODULES: list[str] = ["llmlab.eval.cli", "llmlab.eval.run_cli"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model (benchmark tasks, win rates, perplexity)",
        description="Evaluate a model. Run 'llmlab eval COMMAND --help' for the options of each evaluation.",
    )
    sub = parser.add_subparsers(dest="eval_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: _no_subcommand(parser))
    for name in EVAL_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # evaluation not built yet
            raise
        module.register_eval(sub)


def _no_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def register_eval(sub: Any) -> None:
    p = sub.add_parser(
        "ppl",
        help="sliding-window perplexity and bits per byte",
        description=(
            "Perplexity of MODEL (llmlab checkpoint, quantized checkpoint, HF directory or .gguf file) on a text, "
            "with strided sliding windows as in Hugging Face's perplexity guide; also bits per byte."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="model path")
    p.add_argument(
        "--data",
        default="wikitext2-test",
        help="bundled corpus name (wikitext2-test, wikitext2-valid, tinyshakespeare, ...) or a .txt/.jsonl file "
        "(default: wikitext2-test)",
    )
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: seq-len)")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the text"
    )
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run_ppl)


def load_model(path: str) -> tuple[Any, Any]:
    """``llmlab.load`` (any supported format) with fallbacks to llmlab's own checkpoint readers."""
    try:
        from llmlab.loading import load
    except ModuleNotFoundError as exc:
        if exc.name != "llmlab.loading":
            raise
        from llmlab.model.checkpoint import load_checkpoint, read_config

        if "quantization" in read_config(path):
            from llmlab.quant import load_quantized

            return load_quantized(path)
        return load_checkpoint(path)
    return load(path)


def run_ppl(args: argparse.Namespace) -> int:
    import torch

    from llmlab.data.corpora import read_text
    from llmlab.errors import ConfigError
    from llmlab.eval.perplexity import evaluate_perplexity

    if args.max_tokens is not None and args.max_tokens < 2:
        raise ConfigError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise ConfigError(f"{args.model}: checkpoint has no tokenizer; perplexity needs one")
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    text = read_text(args.data)
    if args.max_tokens is not None:
        # Tokenize only a prefix: BPE tokens average ~4 characters of English, so 16 per token is ample.
        text = text[: args.max_tokens * 16]
    result = evaluate_perplexity(
        model,
        tokenizer,
        text,
        seq_len=args.seq_len,
        stride=args.stride,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        progress=True,
    )
    result = {"model": args.model, "data": args.data, "dtype": args.dtype, **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.data}: perplexity {result['ppl']:.4f}  bits/byte {result['bits_per_byte']:.4f}  "
            f"({result['tokens']} tokens scored, {result['windows']} windows of {args.seq_len}, "
            f"stride {result['stride']}, {result['tokens_per_s']:.0f} tok/s)"
        )
    return 0
