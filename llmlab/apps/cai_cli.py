"""``llmlab judge`` (an LLM judge's agreement with ground truth, or AI-feedback labels for answer pairs) and
``llmlab cai`` (Constitutional AI: critique -> revise, writing preference and SFT data).

    llmlab judge MODEL --pairs tasks|gsm8k-pairs|hh-rlhf-heldout|FILE [--limit N] [--json]
    llmlab judge MODEL --label FILE --out labels.jsonl      # FILE: {"prompt", "a", "b"} records
    llmlab cai MODEL --out DIR [--prompts hh-rlhf|FILE] [--limit N] [--constitution FILE]

and the AI-feedback options of ``llmlab align --feedback ai`` (:func:`add_feedback_arguments`,
:func:`run_align_ai`; the pairs and DPO are :mod:`llmlab.apps.rlaif`). Heavy imports stay in the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llmlab.errors import ConfigError
from llmlab.outputs import add_output_argument


def register(subparsers: Any) -> None:
    judge = subparsers.add_parser(
        "judge",
        help="LLM-as-judge: agreement with ground-truth pairs, or AI-feedback preference labels (RLAIF)",
        description="Ask MODEL which of two answers is better (rubric prompt, both orders). With --pairs: its "
        "agreement with known preferences, self-agreement and position bias. With --label: preference records "
        "for 'llmlab rm --data' / 'llmlab align --data'.",
    )
    judge.add_argument(
        "model", metavar="MODEL", help="judge model (anything llmlab.load reads, or 'smollm2')"
    )
    what = judge.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--pairs", help="ground truth: tasks, gsm8k-pairs, hh-rlhf-heldout or a preference file"
    )
    what.add_argument("--label", metavar="FILE", help='JSONL of {"prompt", "a", "b"} to label')
    judge.add_argument("--limit", type=int, default=None, help="first N pairs")
    judge.add_argument(
        "--min-margin", type=float, default=0.0, help="--label: drop verdicts with |2p-1| <= this"
    )
    judge.add_argument("--json", action="store_true", help="print one JSON object")
    add_output_argument(
        judge, "--label: where to write the labelled pairs (JSONL)", kind="file", required=False
    )
    judge.set_defaults(func=run_judge)

    cai = subparsers.add_parser(
        "cai",
        help="Constitutional AI: sample, critique against a principle, revise; write preference + SFT data",
        description="For each prompt MODEL samples a reply, critiques it against a principle of the "
        "constitution and revises it. Writes DIR/pairs.jsonl (revised preferred over original), DIR/sft.jsonl "
        "(the revisions), DIR/records.jsonl (every step) and DIR/stats.json.",
    )
    cai.add_argument("model", metavar="MODEL", help="policy model (anything llmlab.load reads, or 'smollm2')")
    cai.add_argument("--prompts", default="hh-rlhf",
                     help="hh-rlhf (harmless-base prompts), or a JSONL of {\"prompt\": ...} records")  # fmt: skip
    cai.add_argument("--limit", type=int, default=32, help="prompts (default 32)")
    cai.add_argument("--constitution", default=None, help="constitution JSON (default: the shipped one)")
    cai.add_argument("--max-tokens", type=int, default=128, help="tokens per reply/critique/revision (128)")
    cai.add_argument("--seed", type=int, default=0)
    add_output_argument(cai, "output directory", kind="dir")
    cai.set_defaults(func=run_cai)


def _engine(model: str) -> Any:
    import torch

    from llmlab.infer import LLM
    from llmlab.loading import resolve_model_path

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return LLM(resolve_model_path(model), max_batch_size=32, kv_cache_mb=1024.0)


def _read_jsonl(path: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    from llmlab.apps.constitutional import read_jsonl

    rows = []
    for i, row in read_jsonl(path):
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise ConfigError(f"{path}:{i}: missing field '{missing[0]}'")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no records")
    return rows


def run_judge(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: judge at least one pair")
    if args.label and not args.out:
        raise ConfigError("--label needs --out FILE for the labelled pairs")
    from llmlab.apps.judge import Judge, agreement, label_pairs

    if args.pairs:
        from llmlab.align.data import load_pairs

        pairs = load_pairs(args.pairs, limit=args.limit)
        result = agreement(Judge(_engine(args.model)), pairs)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            lo, hi = result["agreement_ci95"]
            print(f"agreement {result['agreement']:.3f} [{lo:.3f}, {hi:.3f}] (single order "
                  f"{result['agreement_single_order']:.3f}), self-agreement {result['self_agreement']:.3f}, "
                  f"first-position rate {result['first_position_rate']:.3f}, n={result['n']}")  # fmt: skip
        return 0
    rows = _read_jsonl(args.label, ("prompt", "a", "b"))[: args.limit]
    records = label_pairs(Judge(_engine(args.model)), [r["prompt"] for r in rows], [r["a"] for r in rows],
                          [r["b"] for r in rows], min_margin=args.min_margin)  # fmt: skip
    from llmlab.apps.constitutional import write_jsonl

    write_jsonl(args.out, records)
    print(f"wrote {len(records)} labelled pairs ({len(rows) - len(records)} too close to call) to {args.out}")
    return 0


def run_cai(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: at least one prompt")
    from llmlab.apps.constitutional import critique_revise, load_constitution, write_jsonl

    principles = load_constitution(args.constitution) if args.constitution else load_constitution()
    if args.prompts == "hh-rlhf":
        from llmlab.align.data import load_pairs

        prompts = [p.prompt for p in load_pairs("hh-rlhf", limit=args.limit)]
    else:
        raw = [r["prompt"] for r in _read_jsonl(args.prompts, ("prompt",))[: args.limit]]
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in raw]
    out = critique_revise(
        _engine(args.model), prompts, principles, max_tokens=args.max_tokens, seed=args.seed
    )
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "pairs.jsonl", out["pairs"])
    write_jsonl(root / "sft.jsonl", out["sft"])
    write_jsonl(root / "records.jsonl", out["records"])
    (root / "stats.json").write_text(json.dumps(out["stats"], indent=2))
    s = out["stats"]
    print(f"{s['pairs']} pairs from {s['prompts']} prompts ({s['dropped']} dropped), "
          f"{s['tokens_per_pair']} tokens generated per pair -> {root}/pairs.jsonl, {root}/sft.jsonl")  # fmt: skip
    return 0


def add_feedback_arguments(parser: argparse.ArgumentParser) -> None:
    """``llmlab align``'s RLAIF options: ``--feedback ai`` samples pairs from the policy and has a judge label
    them before DPO."""
    g = parser.add_argument_group("AI feedback (RLAIF): --feedback ai")
    g.add_argument("--feedback", choices=["data", "ai"], default="data",
                   help="data: train on 'data=' pairs (default); ai: sample two answers per prompt from the policy, "
                   "label them with --judge (both orders), train on the confident pairs")  # fmt: skip
    g.add_argument("--judge", default="smollm2", metavar="MODEL", help="judge model (default smollm2)")
    g.add_argument("--prompts", default="hh-rlhf",
                   help="prompts: a named preference source (hh-rlhf, tasks, ...) or a JSONL of {\"prompt\"}")  # fmt: skip
    g.add_argument("--n-prompts", type=int, default=64, help="prompts to sample for (default 64)")
    g.add_argument("--min-margin", type=float, default=0.1,
                   help="keep a pair when the judge's combined verdict |2p-1| exceeds this (default 0.1)")  # fmt: skip
    g.add_argument("--sample-tokens", type=int, default=64, help="tokens per sampled answer (default 64)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--labels-only", action="store_true",
                   help="write OUT/ai_feedback.jsonl and stop (train a reward model on it: llmlab rm data=FILE)")  # fmt: skip


def run_align_ai(args: argparse.Namespace, align_cfg: Any) -> int:
    """``llmlab align --feedback ai``: label pairs with the judge, then DPO (``align_cfg``) on them."""
    from llmlab.apps.rlaif import FEEDBACK_FILE, FeedbackConfig, run_rlaif
    from llmlab.outputs import run_summary

    feedback = FeedbackConfig(judge=args.judge, prompts=args.prompts, n_prompts=args.n_prompts,
                              min_margin=args.min_margin, sample_tokens=args.sample_tokens,
                              temperature=args.temperature, labels_only=args.labels_only)  # fmt: skip
    metrics = run_rlaif(align_cfg, feedback, args.out)
    s = metrics["ai_feedback"]
    labels = Path(args.out) / FEEDBACK_FILE
    print(f"AI feedback: {s['kept']} pairs kept of {s['prompts']} prompts ({s['dropped_too_close']} too close to "
          f"call, {s['dropped_identical']} identical); judge self-agreement {s['judge_self_agreement']:.3f}, "
          f"first-position rate {s['judge_first_position_rate']:.3f} -> {labels}")  # fmt: skip
    if args.labels_only:
        print(f"next:   llmlab rm --base {align_cfg.model} data={labels} heldout=null --out RM_DIR")
        return 0
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
             if k.startswith("val_") or k in ("loss", "pairs_train")}  # fmt: skip
    print(json.dumps(shown, indent=1, default=str))
    artefact = "adapter/: the LoRA adapter" if align_cfg.use_lora else "final/: the policy"
    print(run_summary(args.out, artefact, "align_report.json", f"llmlab chat {args.out}"))
    return 0
