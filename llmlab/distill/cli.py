"""``llmlab distill``: train a small student (e.g. a speculative-decoding draft) on a teacher's logits.

Kept import-light: torch and the trainer load inside the handler.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distill a small draft model from a teacher (KD on its logits) and measure speculative decoding",
        description=(
            "Knowledge distillation through the shared trainer: the student copies the teacher's embedding, "
            "final norm and the blocks listed in student_layers, then learns the teacher's next-token "
            "distribution (forward KL at temperature T, times T^2, optionally mixed with cross-entropy by "
            "alpha) on chat-rendered Alpaca conversations, the teacher's own answers (teacher_responses=N) "
            "or a bundled corpus (data=NAME). The report shows KL and top-1 agreement with the teacher on "
            "held-out conversations before and after, and the acceptance rate of greedy speculative decoding "
            "with the student as draft. Settings come from --preset (default smollm2-draft), then --config "
            "YAML, then key=value overrides such as max_steps=100 student_layers=0,1 temperature=2 alpha=0.1."
        ),
    )
    p.add_argument("--teacher", default=None, help="llmlab checkpoint dir, HF dir, .gguf file or 'smollm2'")
    p.add_argument(
        "--out", required=True, help="run directory: final/ (the student), logs, distill_report.json"
    )
    p.add_argument("--preset", default="smollm2-draft", help="named config (default: smollm2-draft)")
    p.add_argument("--config", default=None, help="YAML file of config keys applied over the preset")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_distill)


def _distill(args: argparse.Namespace) -> int:
    from llmlab.train.threads import configure_cpu_threads

    configure_cpu_threads()
    from llmlab.distill.recipe import format_report, load_distill_config, run_distill

    overrides = list(args.overrides)
    if args.teacher is not None:
        overrides.append(f"teacher={args.teacher}")
    cfg = load_distill_config(args.preset, args.config, overrides)
    report = run_distill(cfg, args.out, resume=args.resume)
    print(format_report(report))
    print(f"done: the student in {args.out}/final, report in {args.out}/distill_report.json")
    return 0
