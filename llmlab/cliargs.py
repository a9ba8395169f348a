"""The command-line conventions every verb shares (torch-free, so command modules use it at import time).

- **Settings:** ``--preset NAME``, then ``--config FILE.yaml``, then ``key=value`` overrides, given as
  positional arguments or as ``--set key=value`` (the same thing as a flag). A bare key goes to the one
  section that has it (``max_steps=5`` is ``train.max_steps=5``); an unknown key is named with the closest
  known one (:func:`llmlab.config.qualify_key`).
- **The model a stage starts from:** ``--base`` (old spellings kept as aliases: ``--teacher``, ``--model``),
  anything ``llmlab.load`` reads, or ``smollm2``.
"""

from __future__ import annotations

import argparse

OVERRIDES_HELP = (
    "config overrides key=value, e.g. max_steps=50 (a bare key goes to the one section that has it: "
    "train.max_steps)"
)


def add_config_arguments(
    parser: argparse.ArgumentParser, presets: str, default_preset: str | None = None
) -> None:
    """``--preset``, ``--config``, positional ``key=value`` overrides and ``--set key=value``."""
    default = f" (default: {default_preset})" if default_preset else ""
    parser.add_argument("--preset", default=default_preset, help=f"named config: {presets}{default}")
    parser.add_argument("--config", default=None, help="YAML file of config keys applied over the preset")
    add_override_arguments(parser, OVERRIDES_HELP)


def add_override_arguments(parser: argparse.ArgumentParser, help: str) -> None:
    """Positional ``key=value`` overrides and ``--set key=value``, the same overrides given as flags."""
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=help)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="set_overrides",
        metavar="KEY=VALUE",
        help="an override given as a flag (repeatable; the same as a positional key=value)",
    )


def add_base_argument(parser: argparse.ArgumentParser, what: str, *aliases: str) -> None:
    """``--base`` (and its old spellings ``aliases``): the model the stage starts from."""
    parser.add_argument(
        "--base",
        *aliases,
        dest="base",
        default=None,
        help=f"{what}: llmlab checkpoint dir, HF dir, .gguf file, a run dir, or 'smollm2'",
    )


def overrides_from(args: argparse.Namespace, **flags: object) -> list[str]:
    """The overrides of a parsed command: positional ``key=value``, then ``--set`` ones, then
    ``key=value`` for each flag in ``flags`` that was given (so an explicit flag wins)."""
    items = [*getattr(args, "overrides", []), *getattr(args, "set_overrides", [])]
    items += [f"{key}={value}" for key, value in flags.items() if value is not None]
    return items
