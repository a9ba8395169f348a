"""The main job (``make demo``): the whole pipeline on this machine, from raw text to an aligned, evaluated,
quantized chat model with a report card, in about 15 minutes on a 2-core CPU.

    python -m llmlab.apps.demo [--out runs/demo] [section.key=value ...]

is ``llmlab pipeline --preset tiny --out runs/demo``: a BPE tokenizer and cleaned token shards of the bundled
TinyStories text, a 4M-parameter model pretrained until it beats ``gzip -9``/``xz -9e`` in held-out bits per
byte, SFT on the verifiable task suite, a reward model, DPO on the SFT model's own verifier-judged samples,
GRPO, int8/int4 quantization, every model evaluated on the same held-out tasks and text, and
``runs/demo/report/index.html``. A rerun skips what is done; an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmlab.apps.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="pipeline directory (default runs/demo)")
    parser.add_argument("--preset", default="tiny", help="pipeline preset (default tiny)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="pipeline config overrides")
    args = parser.parse_args(argv)
    from llmlab.cli import main as llmlab_main

    debug = ["--debug"] if args.debug else []
    return llmlab_main([*debug, "pipeline", "--preset", args.preset, "--out", args.out, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
