"""``llmlab`` command line: one entry point, a sub-command per pipeline stage.

Each stage keeps its command in its own package (``llmlab/<area>/cli.py``) with a ``register(subparsers)``
function. Command modules must import heavy libraries (torch, transformers) inside their handlers, so
``llmlab --help`` stays fast.

User errors (:class:`llmlab.errors.LLMLabError`, and bad files) print one line and exit 2; ``--debug`` (before
or after the verb) shows the traceback. A command that writes an output declares it with
:func:`llmlab.outputs.add_output_argument`, and :func:`main` refuses to write over a previous run unless
``--resume`` or ``--overwrite`` is given (:func:`llmlab.outputs.check_output`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llmlab import __version__
from llmlab.errors import LLMLabError
from llmlab.outputs import check_args_output

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
    "llmlab.apps.prompting.cli",  # prompt
    "llmlab.apps.cai_cli",  # judge, cai
    "llmlab.apps.rag.cli",  # rag index, rag ask, rag eval
    "llmlab.apps.agent.cli",  # agent
    "llmlab.medusa.cli",  # medusa
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmlab",
        description="The whole LLM pipeline: tokenizer, data, pretraining, fine-tuning, alignment, inference.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks on errors (also accepted after the verb)"
    )
    parser.add_argument("--version", action="version", version=f"llmlab {__version__}")
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


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without its ``--debug`` flags (before or after the verb; not after a ``--``), and whether
    there was one."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return kept, len(kept) != len(argv)


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand anywhere, also after an option (argparse keeps only the first run).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        check_args_output(args)
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
