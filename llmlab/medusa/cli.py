"""``llmlab medusa MODEL --out DIR``: train Medusa heads on a frozen model, for speculative decoding.

Kept import-light: torch and the trainer load inside the handler.
"""

from __future__ import annotations

import argparse

from llmlab.cliargs import add_config_arguments, overrides_from
from llmlab.outputs import add_output_argument, run_summary


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "medusa",
        help="train Medusa heads (extra decoding heads) on a frozen model for speculative decoding",
        description=(
            "Medusa (Cai et al. 2024) through the shared trainer: K heads (a SiLU residual block each, "
            "projected by the model's own LM head) learn to predict the tokens 2..K+1 ahead from the model's "
            "last hidden state, which is computed once and cached (the model stays frozen). Data: the "
            "model's own answers to shipped Alpaca prompts (--data self, the default), a shipped SFT set "
            "(alpaca, gsm8k, math), a bundled corpus name or a text/JSONL file. The report shows each head's "
            "top-1 accuracy and the greedy chain acceptance length on held-out prompts, before and after. "
            "Decode with LLM(MODEL, speculative={'method': 'medusa', 'heads': DIR}) or "
            "'llmlab generate MODEL --speculative medusa --medusa-heads DIR'. Overrides such as "
            "max_steps=100 max_examples=128 layers=2 share_lm_head=false."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="llmlab checkpoint dir, HF dir, .gguf file, or 'smollm2'")
    add_output_argument(p, "heads directory: medusa_config.json, medusa_heads.safetensors, the report")
    p.add_argument("--heads", type=int, default=None, help="number of heads K (default 4)")
    p.add_argument(
        "--data", default=None, help="self | alpaca | gsm8k | math | corpus name | file (default self)"
    )
    add_config_arguments(p, "smollm2-medusa", default_preset="smollm2-medusa")
    p.set_defaults(func=_medusa)


def _medusa(args: argparse.Namespace) -> int:
    # torch and the trainer load here, not at import: `llmlab --help` stays instant.
    from llmlab.recipes.medusa import format_medusa_report, load_medusa_config, run_medusa
    from llmlab.train.threads import configure_cpu_threads

    configure_cpu_threads()
    overrides = overrides_from(args, base=args.model, heads=args.heads, data=args.data)
    cfg = load_medusa_config(args.preset, args.config, overrides)
    report = run_medusa(cfg, args.out)
    print(format_medusa_report(report))
    next_cmd = (
        f"llmlab generate {cfg.base} --speculative medusa --medusa-heads {args.out} "
        '--prompt "Explain photosynthesis." --max-tokens 64'
    )
    print(run_summary(args.out, "the Medusa heads", "medusa_report.json", next_cmd))
    return 0
