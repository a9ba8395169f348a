"""``llmlab sft``: supervised fine-tuning (full, LoRA or QLoRA) with a before/after report.

Kept import-light: torch and the trainer load inside the handler.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning: full, LoRA or QLoRA, assistant-only loss, before/after report",
        description=(
            "Fine-tune a base model on conversations with loss on assistant tokens only. Data: a JSON/JSONL "
            "file (Alpaca instruction/input/output, chat messages, prompt/completion or question/answer; .gz "
            "ok), a shipped set (alpaca, gsm8k, math) or 'tasks' (the verifiable task suite). Settings come "
            "from --preset (tiny-tasks, tiny-tasks-full, tiny-tasks-quick, tiny-tasks-gentle, tiny-tasks-lora, smollm2-lora, smollm2-qlora), then "
            "--config YAML, then key=value overrides such as max_steps=50 lora_r=16 lora_alpha=32 lr=1e-4 "
            "replay_fraction=0.2 l2sp=1e-3 freeze_layers=2. The report shows SFT val loss, general-text "
            "loss (forgetting) and task exact match before and after."
        ),
    )
    p.add_argument(
        "--base", default=None, help="base model: llmlab checkpoint dir, HF dir, .gguf, or 'smollm2'"
    )
    p.add_argument("--data", default=None, help="data file or name: alpaca, gsm8k, math, tasks")
    p.add_argument(
        "--out", required=True, help="output dir: adapter (lora/qlora) or final/ (full), logs, report"
    )
    p.add_argument(
        "--peft", choices=["none", "lora", "qlora"], default=None, help="what trains (default: preset's)"
    )
    p.add_argument("--preset", default=None, help="named config (see the description)")
    p.add_argument("--config", default=None, help="YAML file of config keys applied over the preset")
    p.add_argument(
        "--skip-invalid", action="store_true", help="count and skip malformed records instead of stopping"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_sft)


def _sft(args: argparse.Namespace) -> int:
    from llmlab.sft.recipe import format_report, load_sft_config, run_sft

    overrides = list(args.overrides)
    for key, value in (("base", args.base), ("data", args.data), ("peft", args.peft)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.skip_invalid:
        overrides.append("skip_invalid=true")
    cfg = load_sft_config(args.preset, args.config, overrides)
    report = run_sft(cfg, args.out, resume=args.resume)
    print(format_report(report))
    artifact = "adapter_config.json + adapter_model.safetensors" if cfg.peft != "none" else "final/"
    print(f"done: {artifact} and sft_report.json in {args.out}")
    return 0
