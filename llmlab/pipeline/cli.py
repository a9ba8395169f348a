"""``llmlab pipeline`` (every stage, resumable, with a report card) and ``llmlab analyze`` (what a stage moved).

Import-light: torch, the recipes and matplotlib load inside the handlers, so ``llmlab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

PRESET_NAMES = ("tiny", "micro", "smollm2", "gpu")
STAGE_NAMES = (
    "tokenizer",
    "data",
    "pretrain",
    "sft",
    "rm",
    "dpo",
    "grpo",
    "ppo",
    "quantize",
    "eval",
    "report",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pipeline",
        help="run every stage: tokenizer, data, pretrain, SFT, reward model, DPO, GRPO/PPO, quantize, eval, report",
        description=(
            "Run the whole pipeline into --out from one config: a preset, then --config YAML, then section.key=value "
            "overrides (sft.train.max_steps=200, dpo.beta=0.2, stages=[tokenizer,data,pretrain,sft]). Finished "
            "stages are skipped on a rerun; a changed config redoes that stage and the ones after it; a killed run "
            f"resumes mid-stage where the recipe can (pretrain, sft). Presets: {', '.join(PRESET_NAMES)} "
            "(tiny: ~15 min on a 2-core CPU; smollm2: LoRA SFT + DPO of SmolLM2-135M-Instruct; gpu: GPT-2-124M "
            "class on one CUDA GPU; micro: seconds, for tests)."
        ),
    )
    p.add_argument("--preset", default=None, help=f"named config: {', '.join(PRESET_NAMES)} (default tiny)")
    p.add_argument("--config", default=None, help="YAML file of config keys applied over the preset")
    p.add_argument("--out", required=True, help="pipeline directory (DIR/<stage>/, DIR/report/index.html)")
    p.add_argument(
        "--from", dest="from_stage", default=None, metavar="STAGE", help="redo STAGE and every later one"
    )
    p.add_argument("--only", default=None, metavar="STAGE", help="run only STAGE (its inputs must be done)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sft.train.max_steps=100"
    )
    p.set_defaults(func=_pipeline)

    a = subparsers.add_parser(
        "analyze",
        help="what a training stage changed: parameter updates per group/layer, attention, output distribution",
        description=(
            "Compare BEFORE and AFTER (checkpoints of one architecture; with --adapter, AFTER + that LoRA adapter): "
            "relative update norms per parameter group and layer (heatmap), update spectra (LoRA effective rank), "
            "per-head attention entropy, keyword attention mass and JS divergence on fixed keyword prompts, and "
            "the next-token KL. Writes OUT/analysis.json and figures."
        ),
    )
    a.add_argument(
        "before", help="the model before the stage (checkpoint dir, run dir, HF dir, .gguf, smollm2)"
    )
    a.add_argument("after", help="the model after the stage")
    a.add_argument("--adapter", default=None, help="a LoRA adapter dir applied on AFTER")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--prompts", type=int, default=8, help="keyword probes to use (default 8)")
    a.set_defaults(func=_analyze)


def _pipeline(args: argparse.Namespace) -> int:
    from llmlab.errors import ConfigError

    if args.preset is not None and args.preset not in PRESET_NAMES:
        raise ConfigError(f"unknown preset '{args.preset}' (presets: {', '.join(PRESET_NAMES)})")
    for flag, stage in (("--from", args.from_stage), ("--only", args.only)):
        if stage is not None and stage not in STAGE_NAMES:
            raise ConfigError(f"{flag}: unknown stage '{stage}' (stages: {', '.join(STAGE_NAMES)})")
    from llmlab.pipeline.config import load_pipeline_config
    from llmlab.pipeline.runner import run_pipeline
    from llmlab.train.threads import configure_cpu_threads

    configure_cpu_threads()
    cfg = load_pipeline_config(args.preset, args.config, args.overrides)
    results = run_pipeline(cfg, args.out, args.from_stage, args.only, preset=args.preset or "tiny")
    print_finish(cfg, args.out, results)
    return 0


def print_finish(cfg, out: str, results: dict) -> None:
    """Where the report is, what each stage changed, how to talk to each stage's model."""
    import json
    from pathlib import Path

    from llmlab.pipeline.config import MODEL_STAGES
    from llmlab.pipeline.report import summary_lines

    root = Path(out)
    print(f"\npipeline finished in {results.get('_elapsed_s', 0) / 60:.1f} min ({root})")
    report = root / "report" / "index.html"
    if report.is_file():
        print(f"report: {report}  (also report.md, metrics.json)")
    metrics_file = root / "eval" / "metrics.json"
    if metrics_file.is_file():
        for line in summary_lines(json.loads(metrics_file.read_text(encoding="utf-8"))):
            print(f"  {line}")
    models = [s for s in MODEL_STAGES if s in cfg.stages and (root / s / "final").is_dir()]
    if models:
        print("chat with or serve a stage's model:")
    for stage in models:
        print(f"  llmlab chat {root / stage / 'final'}    llmlab serve {root / stage / 'final'}")


def _analyze(args: argparse.Namespace) -> int:
    from llmlab.analysis.analyze import analyze

    result = analyze(args.before, args.after, args.out, adapter=args.adapter, n_prompts=args.prompts)
    print(result["summary"])
    print(result["attention_summary"])
    print(f"wrote {args.out}/analysis.json and {', '.join(result['figures'])}", file=sys.stderr)
    return 0
