"""``python -m llmlab ...`` is the ``llmlab`` command (handy under ``torchrun -m llmlab`` and without an install)."""

from llmlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
