"""``llmlab sft``: supervised fine-tuning (full, LoRA or QLoRA) with a before/after report.

Kept import-light: torch and the trainer load inside the handler.
"""

from __future__ import annotations

import argparse

from llmlab.cliargs import add_base_argument, add_config_arguments, overrides_from
from llmlab.outputs import add_output_argument, run_summary

PRESETS = "tiny-tasks, tiny-tasks-full, tiny-tasks-quick, tiny-tasks-gentle, tiny-tasks-lora, smollm2-lora, smollm2-qlora"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning: full, LoRA, QLoRA or another PEFT method, assistant-only loss, before/after report",
        description=(
            "Fine-tune a base model on conversations with loss on assistant tokens only. Data: a JSON/JSONL "
            "file (Alpaca instruction/input/output, chat messages, prompt/completion or question/answer; .gz "
            "ok), a shipped set (alpaca, gsm8k, math) or 'tasks' (the verifiable task suite). Settings come "
            "from --preset, then --config YAML, then key=value overrides such as max_steps=50 lora_r=16 "
            "lora_alpha=32 lr=1e-4 replay_fraction=0.2 l2sp=1e-3 freeze_layers=2. The report shows SFT val "
            "loss, general-text loss (forgetting, flagged above forget_warn_pct) and task exact match before "
            "and after."
        ),
    )
    add_base_argument(p, "base model")
    p.add_argument(
        "--data", default=None, help="data file or name: alpaca, gsm8k, math, tasks (default: tasks)"
    )
    add_output_argument(
        p, "run directory: adapter (any --peft) or final/ (full), logs, sft_report.json", resume=True
    )
    p.add_argument(
        "--peft",
        choices=["none", "lora", "qlora", "dora", "ia3", "prefix", "prompt", "adapter"],
        default=None,
        help="what trains (default: the preset's, else none); method settings as overrides: lora_r=8 "
        "(lora/qlora/dora), ia3_targets=k,v,down, prefix_tokens=16 prefix_projection=true, prompt_tokens=16, "
        "adapter_size=16 adapter_where=attn,ffn",
    )
    add_config_arguments(p, PRESETS)
    p.add_argument(
        "--skip-invalid", action="store_true", help="count and skip malformed records instead of stopping"
    )
    p.set_defaults(func=_sft)


def _sft(args: argparse.Namespace) -> int:
    # torch and the trainer load here, not at import: `llmlab --help` stays instant.
    from llmlab.recipes.sft import format_sft_report, load_sft_config, run_sft

    flags = {"base": args.base, "data": args.data, "peft": args.peft}
    if args.skip_invalid:
        flags["skip_invalid"] = "true"
    cfg = load_sft_config(args.preset, args.config, overrides_from(args, **flags))
    report = run_sft(cfg, args.out, resume=args.resume)
    print(format_sft_report(report))
    artefact = "adapter_config.json + adapter_model.safetensors" if cfg.peft != "none" else "final/"
    print(run_summary(args.out, artefact, "sft_report.json", f"llmlab chat {args.out}"))
    return 0
