"""Constitutional AI, before vs after (issue 21 section 2), on SmolLM2-135M-Instruct in one run:

1. a reward model on the *human* hh-rlhf harmless pairs (``llmlab rm``'s recipe; SmolLM2's trunk frozen but
   for its last ``--rm-layers`` blocks, to fit a CPU): its held-out pairwise accuracy;
2. the policy's greedy answers *before*, on held-out hh-rlhf harmless prompts and on AlpacaEval (helpful)
   prompts;
3. critique -> revise (:mod:`llmlab.apps.constitutional`, the shipped constitution) on ``--n`` hh-rlhf
   training-split prompts: (revision, original) pairs, tokens generated per pair, and how often the reward
   model prefers the revision;
4. LoRA DPO (``llmlab align``'s recipe) of the policy on those pairs (``--rpo-alpha`` > 0 adds the NLL of the
   revision: SFT on the revisions in the same step);
5. the same greedy answers *after*; win rate of after over before per prompt set, judged (a) by the reward
   model and (b) by SmolLM2 as the judge (:mod:`llmlab.apps.judge`, both orders), each with its 95% Wilson
   interval over the decided pairs (:func:`llmlab.pipeline.evaluation.win_rate`).

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/cai_policy.py [--n 64] [--eval 48] [--out F.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import time
from pathlib import Path

import torch

from llmlab.align.data import ASSETS, load_pairs
from llmlab.align.reward_model import RewardModel, score_responses
from llmlab.apps.constitutional import critique_revise, write_jsonl
from llmlab.apps.judge import Judge, summarize
from llmlab.infer import LLM, SamplingParams
from llmlab.infer.chat import chat_stop_ids
from llmlab.loading import resolve_model_path
from llmlab.model.lora import LoRAConfig, merge_and_unload
from llmlab.pipeline.evaluation import win_rate
from llmlab.recipes.common import load_policy, preference_train_config
from llmlab.recipes.dpo import AlignConfig, run_offline
from llmlab.recipes.reward_model import RMConfig, run_reward_model

ALPACA_EVAL = ASSETS.parent / "eval" / "alpaca_eval_805_gpt35turbo_outputs.json.gz"
MAX_PROMPT_TOKENS = 192


def fitting(llm: LLM, source: str, n: int) -> list[list[dict[str, str]]]:
    """The first ``n`` distinct prompts of a preference source whose chat rendering fits MAX_PROMPT_TOKENS."""
    out, seen = [], set()
    for pair in load_pairs(source):
        key = json.dumps(pair.prompt)
        if key not in seen and len(llm.encode_prompt(pair.prompt)[1]) <= MAX_PROMPT_TOKENS:
            seen.add(key)
            out.append(pair.prompt)
        if len(out) == n:
            break
    return out


def helpful_prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rows = json.loads(gzip.decompress(ALPACA_EVAL.read_bytes()))
    random.Random(seed).shuffle(rows)
    return [[{"role": "user", "content": r["instruction"]}] for r in rows[:n]]


def answers(llm: LLM, prompts: list, max_tokens: int) -> tuple[list[str], int]:
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=chat_stop_ids(llm.tokenizer))
    outs = llm.generate(prompts, params)
    return [o.text.strip() for o in outs], sum(len(o.token_ids) for o in outs)


def train_reward_model(model, tok, args, work: Path) -> tuple[RewardModel, dict]:
    rm = RewardModel.from_backbone(model)
    keep = {f"layers.{i}." for i in range(rm.cfg.n_layers - args.rm_layers, rm.cfg.n_layers)}
    for name, p in rm.named_parameters():
        p.requires_grad = name.startswith(("score.", "norm.")) or any(name.startswith(k) for k in keep)
    cfg = RMConfig(model=args.model, data=["hh-rlhf"], heldout="hh-rlhf-heldout", n_heldout=args.rm_heldout,
                   max_pairs=args.rm_steps * args.rm_batch, max_len=args.rm_max_len, skip_invalid=True,
                   train=preference_train_config(lr=1e-4, min_lr=1e-5, warmup_steps=5, max_steps=args.rm_steps,
                                                 batch_size=args.rm_batch, eval_every=0, log_every=10))  # fmt: skip
    m = run_reward_model(cfg, work / "rm", model=rm, tokenizer=tok)
    rm.eval()
    keys = ("heldout_accuracy", "heldout_margin_mean", "heldout_pairs_train", "heldout_pairs_heldout", "loss")
    return rm, {k: m.get(k) for k in keys} | {"trainable_layers": args.rm_layers, "steps": args.rm_steps}


def compare(rm, tok, judge: Judge, prompts: list, after: list[str], before: list[str]) -> dict:
    ra = score_responses(rm, tok, prompts, after, max_len=512)
    rb = score_responses(rm, tok, prompts, before, max_len=512)
    js = judge.compare(prompts, after, before)
    same = [a.strip() == b.strip() for a, b in zip(after, before)]  # identical answers: a tie, whoever judges
    rm_wr = win_rate(
        [a > b and not s for a, b, s in zip(ra, rb, same)], [b > a and not s for a, b, s in zip(ra, rb, same)]
    )
    judge_wr = win_rate(
        [j.p > 0.5 and not s for j, s in zip(js, same)], [j.p < 0.5 and not s for j, s in zip(js, same)]
    )
    return {
        "n": len(prompts),
        "identical_answers": sum(same),
        "rm_mean_before": round(sum(rb) / len(rb), 4),
        "rm_mean_after": round(sum(ra) / len(ra), 4),
        "rm_win_rate": {k: round(v, 4) if isinstance(v, float) else v for k, v in rm_wr.items()},
        "judge_win_rate": {k: round(v, 4) if isinstance(v, float) else v for k, v in judge_wr.items()},
        "judge_self_agreement": summarize(js)["self_agreement"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="policy, reward-model trunk and judge")
    p.add_argument("--n", type=int, default=64, help="hh-rlhf training prompts through critique -> revise")
    p.add_argument("--eval", type=int, default=48, help="held-out prompts per set (harmless, helpful)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer/critique/revision")
    p.add_argument("--rm-steps", type=int, default=100, help="reward-model steps (batch 8 pairs)")
    p.add_argument("--rm-layers", type=int, default=4, help="trainable last blocks of the reward model")
    p.add_argument("--rm-heldout", type=int, default=200, help="held-out human pairs for the RM accuracy")
    p.add_argument("--rm-batch", type=int, default=8, help="reward-model pairs per step")
    p.add_argument("--rm-max-len", type=int, default=256, help="reward-model tokens per sequence")
    p.add_argument("--dpo-epochs", type=float, default=2.0, help="DPO passes over the CAI pairs")
    p.add_argument("--lr", type=float, default=1e-4, help="DPO LoRA learning rate")
    p.add_argument("--rpo-alpha", type=float, default=0.0, help="+ alpha x NLL of the revision (SFT on it)")
    p.add_argument("--work", default="/tmp/cai_policy_run")
    p.add_argument("--out", default="/tmp/cai_policy.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"args": vars(args), "seconds": {}}
    clock = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        result["seconds"][name] = round(now - clock, 1)
        clock = now
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(name, result["seconds"][name], "s", flush=True)

    model, tok = load_policy(args.model)
    rm, result["reward_model"] = train_reward_model(model, tok, args, work)
    print("reward model", result["reward_model"], flush=True)
    stage("reward_model")

    policy = LLM.from_model(model, tok, max_batch_size=48, kv_cache_mb=1536.0, enable_prefix_caching=True)
    sets = {"harmless (hh-rlhf held out)": fitting(policy, "hh-rlhf-heldout", args.eval),
            "helpful (AlpacaEval)": helpful_prompts(args.eval)}  # fmt: skip
    before = {name: answers(policy, prompts, args.max_tokens) for name, prompts in sets.items()}
    stage("answers_before")

    cai_prompts = fitting(policy, "hh-rlhf", args.n)
    cai = critique_revise(policy, cai_prompts, max_tokens=args.max_tokens, seed=0)
    pairs = cai["pairs"]
    write_jsonl(work / "cai_pairs.jsonl", pairs)
    write_jsonl(work / "cai_records.jsonl", cai["records"])
    prompts = [r["prompt"] for r in pairs]
    rc = score_responses(rm, tok, prompts, [r["chosen"] for r in pairs], max_len=512)
    rr = score_responses(rm, tok, prompts, [r["rejected"] for r in pairs], max_len=512)
    copies = sum(
        r["revision"] == r["critique"] for r in cai["records"]
    )  # the "revision" repeats the critique
    result["cai"] = {**cai["stats"], "revision_repeats_critique": copies, "rm_prefers_revision": win_rate([c > r for c, r in zip(rc, rr)],
                                                                     [r > c for c, r in zip(rc, rr)])}  # fmt: skip
    print("cai", result["cai"], flush=True)
    stage("cai")
    del policy

    steps = max(1, round(args.dpo_epochs * len(pairs) * 0.9 / 4))
    cfg = AlignConfig(model=args.model, data=[str(work / "cai_pairs.jsonl")], n_heldout=max(4, len(pairs) // 10),
                      max_len=320, skip_invalid=True, loss="dpo", beta=0.1, rpo_alpha=args.rpo_alpha,
                      use_lora=True, lora=LoRAConfig(r=16, alpha=32.0),
                      train=preference_train_config(lr=args.lr, min_lr=args.lr / 10, warmup_steps=3, max_steps=steps,
                                                    batch_size=4, eval_every=0, log_every=5))  # fmt: skip
    m = run_offline(cfg, work / "dpo", model=model, tokenizer=tok)
    result["dpo"] = {k: m.get(k) for k in ("loss", "val_loss", "val_reward_accuracy", "val_reward_margin",
                                           "val_logratio_ref", "pairs_train", "pairs_heldout")} | {"steps": steps}  # fmt: skip
    print("dpo", result["dpo"], flush=True)
    stage("dpo")

    model = merge_and_unload(model).eval()
    policy = LLM.from_model(model, tok, max_batch_size=48, kv_cache_mb=1536.0, enable_prefix_caching=True)
    after = {name: answers(policy, prompts, args.max_tokens) for name, prompts in sets.items()}
    del policy
    rows = [{"set": name, "prompt": q, "before": b, "after": a}
            for name, prompts in sets.items() for q, b, a in zip(prompts, before[name][0], after[name][0])]  # fmt: skip
    write_jsonl(work / "answers.jsonl", rows)
    stage("answers_after")

    judge = Judge(LLM(resolve_model_path(args.model), max_batch_size=32, kv_cache_mb=1536.0))
    result["compare"] = {}
    for name, prompts in sets.items():
        result["compare"][name] = {
            **compare(rm, tok, judge, prompts, after[name][0], before[name][0]),
            "tokens_before": before[name][1],
            "tokens_after": after[name][1],
            "examples": [
                {
                    "prompt": prompts[i][-1]["content"][:200],
                    "before": before[name][0][i],
                    "after": after[name][0][i],
                }
                for i in range(2)
            ],  # fmt: skip
        }
        print(name, {k: v for k, v in result["compare"][name].items() if k != "examples"}, flush=True)
    stage("compare")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
