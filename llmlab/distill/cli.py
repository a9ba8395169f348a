"""``llmlab distill``: train a small student (e.g. a speculative-decoding draft) on a teacher's logits.

Kept import-light: torch and the trainer load inside the handler.
"""

from __future__ import annotations

import argparse

from llmlab.cliargs import add_base_argument, add_config_arguments, overrides_from
from llmlab.outputs import add_output_argument, run_summary


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
    add_base_argument(p, "the teacher (default: smollm2)", "--teacher")
    add_output_argument(p, "run directory: final/ (the student), logs, distill_report.json", resume=True)
    add_config_arguments(p, "smollm2-draft", default_preset="smollm2-draft")
    p.set_defaults(func=_distill)


def _distill(args: argparse.Namespace) -> int:
    # torch and the trainer load here, not at import: `llmlab --help` stays instant.
    from llmlab.recipes.distill import format_distill_report, load_distill_config, run_distill
    from llmlab.train.threads import configure_cpu_threads

    configure_cpu_threads()
    cfg = load_distill_config(args.preset, args.config, overrides_from(args, teacher=args.base))
    report = run_distill(cfg, args.out, resume=args.resume)
    print(format_distill_report(report))
    next_cmd = (
        f"llmlab generate {cfg.teacher} --speculative draft --draft-model {args.out}/final "
        '--prompt "Explain photosynthesis." --max-tokens 64'
    )
    print(run_summary(args.out, "final/: the student", "distill_report.json", next_cmd))
    return 0
