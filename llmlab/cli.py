"""``llmlab`` command line: one entry point, a sub-command per pipeline stage.

Each stage keeps its command in its own package (``llmlab/<area>/cli.py``) with a ``register(subparsers)``
function. Command modules must import heavy libraries (torch, transformers) inside their handlers, so
``llmlab --help`` stays fast.

User errors (:class:`llmlab.errors.LLMLabError`, and bad files) print one line and exit 2; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module path of every command group, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "llmlab.tokenizer.cli",  # tokenizer train
    "llmlab.data.cli",  # data prepare
    "llmlab.train.cli",  # pretrain
    "llmlab.sft.cli",  # sft
    "llmlab.align.cli",  # rm, align, ppo, grpo
    "llmlab.distill.cli",  # distill
    "llmlab.infer.cli",  # generate, chat
    "llmlab.quant.cli",  # quantize
    "llmlab.eval.cli",  # eval
    "llmlab.interop.cli",  # convert
    "llmlab.pipeline.cli",  # pipeline, analyze
    "llmlab.serve.cli",  # serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmlab",
        description="The whole LLM pipeline: tokenizer, data, pretraining, fine-tuning, alignment, inference.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # stage not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    from llmlab.errors import LLMLabError

    try:
        result = args.func(args)
    except LLMLabError as exc:
        if debug:
            raise
        print(f"llmlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
