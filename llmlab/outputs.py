"""Where commands write: the one check that no verb destroys a previous run silently, and the one way every
training verb ends (where the run is, its report, the next command to try).

Torch-free, so command modules can use it at import time. A command declares its output with
:func:`add_output_argument`; :func:`llmlab.cli.main` then calls :func:`check_output` before the handler runs:

- nothing there (or an empty directory): go ahead;
- something there and ``--resume`` (run directories of resumable stages): continue it;
- something there and ``--overwrite``: remove it first, so no stale checkpoint or metrics line of the old run
  survives beside the new one (only when it looks like llmlab's own output);
- otherwise: a one-line error naming the path and both flags.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from llmlab.errors import LLMLabError

# Files and folders llmlab writes into its output directories; --overwrite removes only a directory holding one.
LLMLAB_MARKERS = (
    "config.json",
    "metrics.jsonl",
    "final",
    "latest",
    "adapter",
    "adapter_config.json",
    "meta.json",
    "tokenizer.json",
    "train.bin",
)


def add_output_argument(
    parser: argparse.ArgumentParser,
    help: str,
    *,
    dest: str = "out",
    positional: bool = False,
    required: bool = True,
    kind: str = "dir",
    resume: bool = False,
) -> None:
    """Add the output path (``--out``, or a positional ``DEST``), ``--overwrite`` and, for resumable stages,
    ``--resume``; :func:`llmlab.cli.main` checks them with :func:`check_output` before the command runs."""
    if positional:
        parser.add_argument(dest, metavar=dest.upper(), help=help)
    else:
        parser.add_argument(f"--{dest}", required=required, default=None, help=help)
    if resume:
        parser.add_argument("--resume", action="store_true", help=f"continue the run in {dest.upper()}")
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace what {dest.upper()} holds (default: refuse)"
    )
    parser.set_defaults(output_dest=dest, output_kind=kind, output_resumable=resume)


def check_args_output(args: argparse.Namespace) -> None:
    """:func:`check_output` for a parsed command whose parser used :func:`add_output_argument`."""
    dest = getattr(args, "output_dest", None)
    if dest is None or getattr(args, dest, None) is None:
        return
    check_output(
        getattr(args, dest),
        resume=bool(getattr(args, "resume", False)),
        overwrite=bool(getattr(args, "overwrite", False)),
        kind=getattr(args, "output_kind", "dir"),
        resumable=bool(getattr(args, "output_resumable", False)),
    )


def check_output(
    path: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    kind: str = "dir",
    resumable: bool = False,
) -> None:
    """Refuse to write over an existing output unless ``resume`` or ``overwrite`` (see the module docstring).

    ``kind`` is ``"dir"`` (a run or output directory) or ``"file"``; ``resumable`` says whether the command
    has ``--resume`` (named in the error)."""
    path = Path(path)
    if not _holds_something(path):
        return
    if resume:
        return
    if not overwrite:
        what = "holds a previous run" if kind == "dir" and path.is_dir() else "exists"
        flags = (
            "--resume to continue it or --overwrite to replace it"
            if resumable
            else "--overwrite to replace it"
        )
        raise LLMLabError(f"{path}: {what}; pass {flags}")
    if path.is_file() or path.is_symlink():
        path.unlink()
        return
    _refuse_dangerous(path)
    shutil.rmtree(path)


def _holds_something(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def _refuse_dangerous(path: Path) -> None:
    """--overwrite removes a directory only when it is llmlab's output, and never one that holds the current
    directory or the home directory."""
    resolved = path.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if cwd.is_relative_to(resolved) or home.is_relative_to(resolved):
        raise LLMLabError(f"{path}: refusing to remove it (it holds the current or home directory)")
    if not any((path / m).exists() for m in LLMLAB_MARKERS) and not any(path.glob("*_report.json")):
        raise LLMLabError(
            f"{path}: does not look like an llmlab output (no config.json, metrics.jsonl, final/, ...); "
            "refusing to remove it with --overwrite: remove it yourself or pick another directory"
        )


def run_summary(out: str | Path, artefact: str, report: str | None, next_command: str | None) -> str:
    """How every training verb ends: where the run is, its report file and the next command to try."""
    out = Path(out)
    lines = [f"run:    {out}  ({artefact})"]
    if report:
        lines.append(f"report: {out / report}")
    if next_command:
        lines.append(f"next:   {next_command}")
    return "\n".join(lines)
