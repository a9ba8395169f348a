"""``llmlab rm``, ``llmlab rm score``, ``llmlab align``, ``llmlab ppo``, ``llmlab grpo``.

Each training command takes ``--base`` (the policy; the config key ``model``), ``--preset``/``--config``
YAML/``key=value`` overrides (``max_steps=50``, ``beta=0.2``; :mod:`llmlab.cliargs`) and ``--out`` (refused
when it holds a run, unless ``--overwrite``). Import-light: torch and the runners load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmlab.apps.cai_cli import add_feedback_arguments
from llmlab.cliargs import add_base_argument, add_config_arguments, overrides_from
from llmlab.outputs import add_output_argument, run_summary


class _RMParser(argparse.ArgumentParser):
    """``llmlab rm ...`` trains; ``llmlab rm score ...`` scores. The second form is routed to its own parser
    so ``llmlab rm score --help`` shows the scoring options."""

    score_parser: argparse.ArgumentParser | None = None

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] == "score" and self.score_parser is not None:
            return self.score_parser.parse_known_args(args[1:], namespace)
        return super().parse_known_args(args, namespace)


def _common(p: argparse.ArgumentParser, presets: str, report: str) -> None:
    add_base_argument(p, "the policy to start from (the config key 'model'; also 'base=')")
    add_config_arguments(p, presets)
    add_output_argument(p, f"run directory: metrics.jsonl, {report}, final/ or adapter/")


def register(subparsers: argparse._SubParsersAction) -> None:
    # add_parser has no parser_class argument before Python 3.12: swap the class for this one parser.
    default_class = subparsers._parser_class
    subparsers._parser_class = _RMParser
    rm = subparsers.add_parser(
        "rm",
        help="train a reward model on preference pairs (or 'llmlab rm score RM_DIR ...' to score responses)",
        description=(
            "Train a reward model: the Transformer of '--base CKPT' plus a scalar head on the last token, with the "
            "Bradley-Terry loss. Data: 'data=[hh-rlhf]' (default), tasks, gsm8k-pairs (GSM8K TEST questions: do "
            "not report GSM8K-test after training on them) or a JSONL of {prompt, chosen, rejected[, margin]}. "
            "Reports held-out pairwise accuracy and writes reward_margins.png. "
            "'llmlab rm score --help' for scoring."
        ),
    )
    subparsers._parser_class = default_class
    _common(rm, "none yet; start from defaults", "rm_eval.json, reward_margins.png")
    rm.set_defaults(func=_rm_train)
    score = argparse.ArgumentParser(
        prog="llmlab rm score",
        description="Score responses with a reward model: one --prompt and several --response, or --file JSONL "
        "of {prompt, response} records. Prints one reward per response.",
    )
    score.add_argument("reward_model", help="reward-model checkpoint directory (from 'llmlab rm')")
    score.add_argument("--prompt", help="user prompt")
    score.add_argument("--response", action="append", default=[], help="a response to score (repeatable)")
    score.add_argument("--file", help="JSONL of {prompt, response} records")
    score.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    score.set_defaults(func=_rm_score, command="rm score")
    rm.score_parser = score

    al = subparsers.add_parser(
        "align",
        help="offline preference optimization: DPO, IPO, KTO, ORPO, SimPO (full or LoRA)",
        description=(
            "Preference-optimize '--base CKPT' on preference pairs (data=[tasks], hh-rlhf, gsm8k-pairs or a JSONL). "
            "The reference log-probs are computed once and cached; with use_lora=true the reference is the base "
            "with the adapter disabled. Presets: tiny-dpo, smollm2-dpo-lora. '--feedback ai' (RLAIF): pairs "
            "sampled from the policy and labelled by --judge in both orders, then DPO on them."
        ),
    )
    al.add_argument(
        "--loss", choices=["dpo", "dpop", "ipo", "kto", "orpo", "simpo"], default=None, help="objective"
    )
    al.add_argument(
        "--skip-invalid", action="store_true", help="count and skip malformed pairs instead of stopping"
    )
    _common(al, "tiny-dpo, smollm2-dpo-lora", "align_report.json")
    add_feedback_arguments(al)  # --feedback ai: RLAIF pairs from a judge (llmlab.apps.rlaif)
    al.set_defaults(func=_align)

    ppo = subparsers.add_parser(
        "ppo",
        help="PPO with a reward model (or verifier/proxy reward), KL penalty, GAE and a value head",
        description=(
            "RLHF with PPO: '--base SFT_CKPT reward_model=RM_DIR'. Per-token KL penalty kl_coef (adaptive_kl=true "
            "targets target_kl), GAE, clipped policy and value losses, ppo_epochs minibatch passes per rollout; "
            "stops (restoring the last good policy) when the KL passes kl_stop. reward=proxy is a deliberately "
            "length-biased reward for the reward-hacking demo."
        ),
    )
    _common(ppo, "tiny-ppo", "ppo_report.json")
    ppo.set_defaults(func=_ppo)

    grpo = subparsers.add_parser(
        "grpo",
        help="GRPO with verifiable rewards (exact match + format) on the task suite or math word problems",
        description=(
            "GRPO: group_size samples per prompt, group-normalized advantages, clipped objective, k3 KL to the "
            "reference (beta). source=tasks[:a,b] | svamp | multiarith | addsub | singleeq | gsm8k (train split). "
            "Reports held-out exact match before and after."
        ),
    )
    _common(grpo, "tiny-grpo", "grpo_report.json")
    grpo.set_defaults(func=_grpo)


def _build(cls, presets, args, **flags):
    from llmlab.config import build_config

    overrides = overrides_from(args, model=args.base, **flags)
    return build_config(cls, presets, args.preset, args.config, overrides, {"base": "model"})


def _print(metrics: dict, keys: tuple[str, ...] | None = None) -> None:
    shown = {
        k: (round(v, 4) if isinstance(v, float) else v)
        for k, v in metrics.items()
        if keys is None or k in keys
    }
    print(json.dumps(shown, indent=1, default=str))


def _policy_artefact(cfg) -> str:
    return "adapter/: the LoRA adapter" if cfg.use_lora else "final/: the policy"


def _rm_train(args: argparse.Namespace) -> int:
    from llmlab.recipes.reward_model import RMConfig, run_reward_model

    cfg = _build(RMConfig, {}, args)
    m = run_reward_model(cfg, args.out)
    _print(m, tuple(k for k in m if k.startswith("heldout_")) + ("loss",))
    next_cmd = f"llmlab ppo --base {cfg.model} reward_model={args.out}/final --out {args.out}-ppo"
    print(run_summary(args.out, "final/: the reward model; reward_margins.png", "rm_eval.json", next_cmd))
    return 0


def _rm_score(args: argparse.Namespace) -> int:
    from llmlab.align.reward_model import load_reward_model, score_responses
    from llmlab.errors import ConfigError, DataError

    rm, tok = load_reward_model(args.reward_model)
    if tok is None:
        raise ConfigError(f"{args.reward_model}: has no tokenizer")
    prompts, responses = [], []
    if args.file:
        from llmlab.sft.datasets import read_records

        for where, rec in read_records(args.file):
            if isinstance(rec, Exception):
                raise rec
            if (
                not isinstance(rec, dict)
                or not isinstance(rec.get("prompt"), str)
                or not isinstance(rec.get("response"), str)
            ):
                raise DataError(f"{where}: need string fields 'prompt' and 'response'")
            prompts.append([{"role": "user", "content": rec["prompt"]}])
            responses.append(rec["response"])
    if args.prompt is not None:
        if not args.response:
            raise ConfigError("--prompt needs at least one --response")
        for r in args.response:
            prompts.append([{"role": "user", "content": args.prompt}])
            responses.append(r)
    if not responses:
        raise ConfigError("nothing to score: give --prompt and --response, or --file")
    scores = score_responses(rm, tok, prompts, responses)
    for p, r, s in zip(prompts, responses, scores):
        if args.json:
            print(json.dumps({"prompt": p[0]["content"], "response": r, "reward": s}))
        else:
            print(f"{s:+.4f}\t{r[:80]!r}")
    return 0


def _align(args: argparse.Namespace) -> int:
    from llmlab.recipes.dpo import ALIGN_PRESETS, REPORT_FILE, AlignConfig, run_offline

    cfg = _build(
        AlignConfig, ALIGN_PRESETS, args, loss=args.loss, skip_invalid="true" if args.skip_invalid else None
    )
    if args.feedback == "ai":
        from llmlab.apps.cai_cli import run_align_ai

        return run_align_ai(args, cfg)
    m = run_offline(cfg, args.out)
    _print(
        m,
        tuple(k for k in m if k.startswith("val_"))
        + ("loss", "pairs_train", "skipped_invalid", "rounds_summary"),
    )
    print(run_summary(args.out, _policy_artefact(cfg), REPORT_FILE, f"llmlab chat {args.out}"))
    return 0


def _ppo(args: argparse.Namespace) -> int:
    from llmlab.recipes.ppo import PPO_PRESETS, PPOConfig, run_ppo

    cfg = _build(PPOConfig, PPO_PRESETS, args)
    m = run_ppo(cfg, args.out)
    _print(
        m,
        tuple(
            k
            for k in m
            if k.startswith(("before_exact", "after_exact", "first_score", "last_score"))
            or k.endswith("reward_score")
        )
        + ("mean_kl", "steps", "kl_stopped"),
    )
    print(run_summary(args.out, _policy_artefact(cfg), "ppo_report.json", f"llmlab chat {args.out}"))
    return 0


def _grpo(args: argparse.Namespace) -> int:
    from llmlab.recipes.grpo import GRPO_PRESETS, GRPOConfig, run_grpo

    cfg = _build(GRPOConfig, GRPO_PRESETS, args)
    m = run_grpo(cfg, args.out)
    _print(m, tuple(k for k in m if k.startswith(("before_exact", "after_exact"))) + ("reward_mean", "kl"))
    print(run_summary(args.out, _policy_artefact(cfg), "grpo_report.json", f"llmlab chat {args.out}"))
    return 0
