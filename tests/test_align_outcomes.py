"""End-to-end alignment outcomes on the CPU demo model (slow: run with ``-m slow`` or as a script).

The "SFT model" is a small chat model trained from scratch on the task suite (``train_tiny_sft``). From it:

- **DPO** on the task suite's preference pairs; held-out win rate against the SFT model, judged by the
  verifier (a win: DPO's greedy answer is correct and SFT's is not; ties excluded, and reported);
- **GRPO** with verifiable rewards: held-out exact match per task before and after;
- **PPO** with a reward model trained on task pairs: reward-model score up with mean KL within the target;
- **reward hacking**: PPO on a length-biased proxy reward with β = 0 and β > 0: proxy up, verifier down
  without the KL term.

``python tests/test_align_outcomes.py [dpo|grpo|ppo|hack|all] [--dir DIR]`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _align_helpers import train_tiny_sft  # noqa: E402

from llmlab.align import rollout as R  # noqa: E402
from llmlab.recipes.common import preference_train_config  # noqa: E402
from llmlab.train.config import TrainConfig  # noqa: E402

pytestmark = pytest.mark.slow
SFT_STEPS = int(os.environ.get("LLMLAB_ALIGN_SFT_STEPS", "400"))


def quiet(train: TrainConfig) -> TrainConfig:
    train.progress = train.tensorboard = train.plot = False
    return train


def win_rate(sft, policy, tok, n_per_task: int = 50) -> dict:
    """Verifier-judged head-to-head on held-out task prompts (greedy answers; 450 prompts: at 180 the
    decided prompts were ~20 and one run's rate swung by +-15 points)."""
    problems = R.load_problems("tasks", "test", n_per_task * 9)
    prompts = [R.prompt_token_ids(tok, p) for p in problems]
    a = R.generate(sft, tok, prompts, 24, 0.0, 1.0, 0)
    b = R.generate(policy, tok, prompts, 24, 0.0, 1.0, 0)
    wins = losses = ties = 0
    for p, x, y in zip(problems, a, b):
        cx, cy = R.score_completion(p, x.text)[0], R.score_completion(p, y.text)[0]
        wins += cy and not cx
        losses += cx and not cy
        ties += cx == cy
    return {
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "n": len(problems),
        "win_rate_decided": wins / max(wins + losses, 1),
        "win_rate_ties_half": (wins + 0.5 * ties) / len(problems),
    }


def dpo_outcome(sft, tok, out: Path, **overrides) -> dict:
    """The ``tiny-dpo`` preset (iterative DPO + RPO on the SFT model's own verifier-judged samples), with
    ``overrides`` of its top-level keys (e.g. ``rounds=1``, ``data="tasks"`` for the synthetic wrong answers)."""
    from llmlab.recipes.dpo import ALIGN_PRESETS, run_offline

    policy = copy.deepcopy(sft)
    cfg = copy.deepcopy(ALIGN_PRESETS["tiny-dpo"])
    for key, value in overrides.items():
        setattr(cfg, key, value if key != "data" else [value])
    quiet(cfg.train)
    t = time.perf_counter()
    tag = "_".join(f"{k}{v}" for k, v in overrides.items()).replace(":", "_") or "preset"
    m = run_offline(cfg, out / f"dpo_{tag}", model=policy, tokenizer=tok)
    res = {
        "val_reward_accuracy": m["val_reward_accuracy"],
        "val_reward_margin": m["val_reward_margin"],
        "rounds_summary": m.get("rounds_summary"),
        "seconds": time.perf_counter() - t,
    }
    res.update(win_rate(sft, policy.eval(), tok))
    return res


def grpo_outcome(sft, tok, out: Path, source: str | None = None, temperature: float | None = None) -> dict:
    """The ``tiny-grpo`` preset on this SFT model (optionally another source / temperature)."""
    from llmlab.recipes.grpo import GRPO_PRESETS, run_grpo

    policy = copy.deepcopy(sft)
    cfg = copy.deepcopy(GRPO_PRESETS["tiny-grpo"])
    cfg.source = source or cfg.source
    cfg.temperature = temperature if temperature is not None else cfg.temperature
    cfg.train = quiet(cfg.train)
    t = time.perf_counter()
    m = run_grpo(
        cfg,
        out / f"grpo_{cfg.source.replace(':', '_').replace(',', '+')}_t{cfg.temperature}",
        model=policy,
        tokenizer=tok,
        progress=False,
    )
    m["seconds"] = time.perf_counter() - t
    gains = {
        k[len("after_") :]: m[k] - m["before_" + k[len("after_") :]] for k in m if k.startswith("after_exact")
    }
    m["best_task_gain"] = max(v for k, v in gains.items() if "/" in k)
    return m


def ppo_outcome(sft, tok, out: Path, lr: float = 5e-5, tag: str = "") -> dict:
    from llmlab.recipes.ppo import PPOConfig, run_ppo
    from llmlab.recipes.reward_model import RMConfig, run_reward_model

    rm_cfg = RMConfig(data=["tasks"], heldout=None, n_heldout=200, max_pairs=2000, max_len=128)
    rm_cfg.train = quiet(
        preference_train_config(
            lr=3e-4, min_lr=3e-5, warmup_steps=5, max_steps=80, batch_size=16, eval_every=0, log_every=10
        )
    )
    rm_metrics = run_reward_model(rm_cfg, out / "rm", model=copy.deepcopy(sft), tokenizer=tok)
    cfg = PPOConfig(
        reward="rm",
        reward_model=str(out / "rm" / "final"),
        source="tasks",
        n_train=2000,
        n_eval=180,
        prompts_per_step=16,
        max_new_tokens=20,
        kl_coef=0.05,
        adaptive_kl=True,
        target_kl=3.0,
        kl_stop=30.0,
        ppo_epochs=2,
        minibatch=8,
        micro_batch=16,
    )
    cfg.train = quiet(
        preference_train_config(
            lr=lr,
            min_lr=lr,
            warmup_steps=0,
            max_steps=40,
            batch_size=16,
            eval_every=0,
            log_every=1,
            schedule="constant",
        )
    )
    t = time.perf_counter()
    m = run_ppo(cfg, out / f"ppo{tag}", model=copy.deepcopy(sft), tokenizer=tok, progress=False)
    m["seconds"] = time.perf_counter() - t
    m["rm_heldout_accuracy"] = rm_metrics["heldout_accuracy"]
    hist = [json.loads(x) for x in (out / f"ppo{tag}" / "metrics.jsonl").read_text().splitlines()]
    scores = [h["score"] for h in hist if "score" in h]
    m["score_first5"] = sum(scores[:5]) / max(len(scores[:5]), 1)
    m["score_last5"] = sum(scores[-5:]) / max(len(scores[-5:]), 1)
    return m


def hack_outcome(sft, tok, out: Path, lr: float = 5e-4, tag: str = "") -> dict:
    from llmlab.recipes.ppo import PPOConfig, run_ppo

    res = {}
    for beta in (0.0, 0.3):
        cfg = PPOConfig(
            reward="proxy",
            source="tasks",
            n_train=2000,
            n_eval=180,
            prompts_per_step=16,
            max_new_tokens=24,
            kl_coef=beta,
            kl_stop=None,
            ppo_epochs=2,
            minibatch=8,
            micro_batch=16,
            proxy_length_bonus=0.05,
        )
        cfg.train = quiet(
            preference_train_config(
                lr=lr,
                min_lr=lr,
                warmup_steps=0,
                max_steps=40,
                batch_size=16,
                eval_every=0,
                log_every=1,
                schedule="constant",
            )
        )
        m = run_ppo(
            cfg, out / f"hack{tag}_beta{beta}", model=copy.deepcopy(sft), tokenizer=tok, progress=False
        )
        hist = [
            json.loads(x) for x in (out / f"hack{tag}_beta{beta}" / "metrics.jsonl").read_text().splitlines()
        ]
        h = [x for x in hist if "score" in x]
        res[f"beta={beta}"] = {
            "proxy_first5": sum(x["score"] for x in h[:5]) / 5,
            "proxy_last5": sum(x["score"] for x in h[-5:]) / 5,
            "len_first5": sum(x["response_len"] for x in h[:5]) / 5,
            "len_last5": sum(x["response_len"] for x in h[-5:]) / 5,
            "heldout_exact_before": m["before_exact_match"],
            "heldout_exact_after": m["after_exact_match"],
            "mean_kl": m.get("mean_kl"),
        }
    return res


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    torch.set_num_threads(1)
    return train_tiny_sft(tmp_path_factory.mktemp("sft") / "model", steps=SFT_STEPS)


def test_dpo_beats_sft(sft_model, tmp_path):
    # Measured (450 prompts): session 4, the preset 18 wins / 9 losses (66.7%) and one round 20 / 6; session 6,
    # the preset 20 / 5 (80%). This SFT model is right on only ~9% of prompts, so few prompts are decided; on the
    # weak demo SFT model the preset gave 68.3% and 68.8% (BENCHMARKS.md).
    r = dpo_outcome(*sft_model, tmp_path)
    print(json.dumps(r))
    assert r["win_rate_decided"] >= 0.65


# Measured (session 6, 1 thread): count_words 68.9% -> 82.2% (+13.3 points, 284 s); loss_type dapo / dr_grpo and
# Dr. GRPO (dr_grpo, scale_rewards=false) on the same model: +12.2 / +12.2 / +13.3. The gain depends on the
# from-scratch SFT model this fixture trains: session 5's fixture gained +8.9, and one trained at 8 threads on
# another machine (81.1% before) +1.1 (BENCHMARKS.md).
def test_grpo_improves_a_task(sft_model, tmp_path):
    r = grpo_outcome(*sft_model, tmp_path)
    print(json.dumps(r))
    assert r["best_task_gain"] >= 0.10


# Measured (session 6, 1 thread): training-rollout RM score 3.01 (first 5 steps) -> 3.32 (last 5), mean KL 0.36;
# held-out greedy RM score 3.003 -> 3.041, sampled 2.904 -> 2.947 (209 s). Session 1's settings had given
# 1.565 -> 1.571, so this test was xfail until now; tiny-ppo's 4-seed figures are in BENCHMARKS.md.
def test_ppo_raises_reward_within_kl(sft_model, tmp_path):
    r = ppo_outcome(*sft_model, tmp_path)
    print(json.dumps(r))
    assert r["score_last5"] > r["score_first5"] and r["mean_kl"] <= 3.0 * 1.5


def test_reward_hacking_without_kl(sft_model, tmp_path):
    r = hack_outcome(*sft_model, tmp_path)
    print(json.dumps(r))
    free = r["beta=0.0"]
    assert (
        free["proxy_last5"] > free["proxy_first5"]
        and free["heldout_exact_after"] < free["heldout_exact_before"]
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="*", default=["all"])
    ap.add_argument("--dir", default="/tmp/llmlab_align_outcomes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.dir)
    t0 = time.perf_counter()
    sft, tok = train_tiny_sft(root / "sft", steps=SFT_STEPS)
    print(json.dumps({"sft_seconds": time.perf_counter() - t0}), flush=True)
    todo = ["dpo", "grpo", "ppo", "hack"] if "all" in args.what else args.what
    fns = {
        "dpo": dpo_outcome,
        "dpo_plain": lambda s, t, o: dpo_outcome(s, t, o, rpo_alpha=0.0),
        "dpo_one_round": lambda s, t, o: dpo_outcome(s, t, o, rounds=1),
        "dpo_synthetic": lambda s, t, o: dpo_outcome(s, t, o, data="tasks"),
        "grpo_all": lambda s, t, o: grpo_outcome(s, t, o, "tasks", 1.0),
        "ppo_fast": lambda s, t, o: ppo_outcome(s, t, o, 2e-4, "_lr2e-4"),
        "hack_slow_lr": lambda s, t, o: hack_outcome(s, t, o, 1e-4, "_lr1e-4"),
        "grpo": grpo_outcome,
        "ppo": ppo_outcome,
        "hack": hack_outcome,
    }
    for name in todo:
        r = fns[name](sft, tok, root)
        print(json.dumps({name: r}, default=str), flush=True)
