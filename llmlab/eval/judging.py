"""Chat quality by a judge: reward-model pairwise accuracy and the win rate of model A over model B.

A judge scores a pair of answers to one prompt. A reward model (:mod:`llmlab.align.reward_model`) scores
each answer on its own, so ``p(A beats B) = sigmoid(r_A - r_B)`` (Bradley-Terry); a pairwise judge
(``judge(prompt, first, second) -> p(first is better)``) is asked in both orders and the two verdicts are
averaged, ``p = (judge(A, B) + 1 - judge(B, A)) / 2``, so a preference for the first (or second) position
cancels out.

- raw win rate: ``mean_i p_i`` (ties count half);
- length-controlled win rate (AlpacaEval 2): fit ``p_i ~ sigmoid(theta_0 + theta_1 * tanh(d_i / sd(d)))``
  with ``d_i = len(A_i) - len(B_i)`` in characters (logistic regression on soft labels), then report
  ``sigmoid(theta_0)``: the win rate had both answers been equally long;
- 95 % confidence intervals by a seeded bootstrap over prompts (the fit is redone on each resample).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llmlab.align.data import load_pairs
from llmlab.align.reward_model import load_reward_model, score_responses
from llmlab.errors import ConfigError
from llmlab.eval.metrics import mean_stderr
from llmlab.eval.records import EVAL_ASSETS, read_json_records
from llmlab.infer import LLM, SamplingParams

PROMPT_SETS = {
    "vicuna": (EVAL_ASSETS / "vicuna_bench_questions.jsonl.gz", "turns"),
    "mt_bench": (EVAL_ASSETS / "mt_bench_questions.jsonl.gz", "turns"),
    "alpaca_eval": (EVAL_ASSETS / "alpaca_eval_805_gpt35turbo_outputs.json.gz", "instruction"),
}
PairJudge = Callable[[str, str, str], float]


def load_prompts(name: str, limit: int | None = None) -> list[str]:
    """First-turn prompts of a bundled set (``vicuna``, ``mt_bench`` or ``alpaca_eval``)."""
    if name not in PROMPT_SETS:
        raise ConfigError(f"unknown prompt set {name!r} (known: {', '.join(PROMPT_SETS)})")
    path, key = PROMPT_SETS[name]
    recs, _ = read_json_records(path)
    out = []
    for _, rec in recs:
        if key == "turns":
            out.append(rec["turns"][0])
        else:
            out.append(rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else ""))
    return out[:limit] if limit is not None else out


def _sigmoid(x: np.ndarray | float) -> Any:
    return 1.0 / (1.0 + np.exp(-x))


def fit_length_controlled(prefs: np.ndarray, len_diff: np.ndarray, steps: int = 50) -> float:
    """``sigmoid(theta_0)`` of the logistic fit ``prefs ~ sigmoid(theta_0 + theta_1 tanh(d / sd(d)))`` (Newton)."""
    sd = float(np.std(len_diff))
    x = np.tanh(len_diff / sd) if sd > 0 else np.zeros_like(len_diff, dtype=np.float64)
    X = np.stack([np.ones_like(x), x], axis=1)
    theta = np.zeros(2)
    for _ in range(steps):
        p = _sigmoid(X @ theta)
        grad = X.T @ (prefs - p)
        hess = (X * (p * (1 - p))[:, None]).T @ X + 1e-6 * np.eye(
            2
        )  # tiny ridge: separable data stays finite
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return float(_sigmoid(theta[0]))


def winrate_stats(prefs: Sequence[float], len_a: Sequence[int], len_b: Sequence[int], n_boot: int = 1000,
                  seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Raw and length-controlled win rate of A with 95 % bootstrap CIs, from per-prompt ``p(A beats B)``."""
    p = np.asarray(prefs, dtype=np.float64)
    d = np.asarray(len_a, dtype=np.float64) - np.asarray(len_b, dtype=np.float64)
    if len(p) < 2:
        raise ConfigError("a win rate needs at least 2 prompts")
    rng = np.random.default_rng(seed)
    raw, lc = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, len(p), len(p))
        raw.append(p[idx].mean())
        lc.append(fit_length_controlled(p[idx], d[idx]))
    return {
        "winrate": float(p.mean()),
        "winrate_stderr": mean_stderr(p.tolist()),
        "winrate_ci95": [float(np.quantile(raw, 0.025)), float(np.quantile(raw, 0.975))],
        "lc_winrate": fit_length_controlled(p, d),
        "lc_winrate_ci95": [float(np.quantile(lc, 0.025)), float(np.quantile(lc, 0.975))],
        "mean_len_a": float(np.mean(len_a)),
        "mean_len_b": float(np.mean(len_b)),
        "n": len(p),
    }


def judge_both_orders(
    judge: PairJudge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
) -> list[float]:
    """``p(A beats B)`` per prompt from a pairwise judge asked in both orders (position bias cancels)."""
    return [0.5 * (judge(q, x, y) + 1.0 - judge(q, y, x)) for q, x, y in zip(prompts, a, b, strict=True)]


def reward_preferences(rm: Any, tokenizer: Any, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
                       batch_size: int = 16) -> list[float]:  # fmt: skip
    """``sigmoid(r_A - r_B)`` per prompt from a reward model (scores do not depend on order)."""
    convs = [[{"role": "user", "content": q}] for q in prompts]
    ra = score_responses(rm, tokenizer, convs, list(a), batch_size=batch_size)
    rb = score_responses(rm, tokenizer, convs, list(b), batch_size=batch_size)
    return [float(_sigmoid(x - y)) for x, y in zip(ra, rb, strict=True)]


def pairwise_accuracy(judge: str | Any, pairs: str | Sequence[Any] = "hh-rlhf-heldout", limit: int | None = None,
                      batch_size: int = 16) -> dict[str, float]:  # fmt: skip
    """Share of held-out preference pairs where the reward model scores ``chosen`` above ``rejected``."""
    rm, tok = load_reward_model(judge) if isinstance(judge, (str,)) else judge
    items = load_pairs(pairs, limit=limit) if isinstance(pairs, str) else list(pairs)[:limit]
    chosen = score_responses(
        rm, tok, [p.prompt for p in items], [p.chosen for p in items], batch_size=batch_size
    )
    rejected = score_responses(rm, tok, [p.prompt for p in items], [p.rejected for p in items],
                               batch_size=batch_size)  # fmt: skip
    correct = [float(c > r) for c, r in zip(chosen, rejected, strict=True)]
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {"accuracy": sum(correct) / len(correct), "accuracy_stderr": mean_stderr(correct),
            "mean_margin": float(np.mean(margins)), "n": len(correct)}  # fmt: skip


def _answers(model: Any, prompts: list[str], max_tokens: int, batch_size: int) -> list[str]:
    llm = model if isinstance(model, LLM) else LLM(model, max_batch_size=batch_size)
    outs = llm.generate([[{"role": "user", "content": q}] for q in prompts],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens))  # fmt: skip
    return [o.text.strip() for o in outs]


def winrate(
    model_a: Any,
    model_b: Any,
    judge: str | Any | PairJudge,
    prompts: str | Sequence[str] = "vicuna",
    limit: int | None = None,
    max_tokens: int = 128,
    *,
    answers_a: Sequence[str] | None = None,
    answers_b: Sequence[str] | None = None,
    batch_size: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Win rate of ``model_a`` over ``model_b`` (paths or ``LLM`` s; or pass ``answers_a``/``answers_b``).

    ``judge`` is a reward-model directory, a loaded ``(reward_model, tokenizer)`` pair, or a pairwise
    callable ``judge(prompt, first, second) -> p(first is better)`` (asked in both orders). Returns
    :func:`winrate_stats` plus ``judge`` (kind), ``prompts`` and the answers.
    """
    qs = load_prompts(prompts, limit) if isinstance(prompts, str) else list(prompts)[:limit]
    a = list(answers_a) if answers_a is not None else _answers(model_a, qs, max_tokens, batch_size)
    b = list(answers_b) if answers_b is not None else _answers(model_b, qs, max_tokens, batch_size)
    if len(a) != len(qs) or len(b) != len(qs):
        raise ConfigError(f"got {len(a)} and {len(b)} answers for {len(qs)} prompts")
    if callable(judge) and not isinstance(judge, tuple):
        prefs, kind = judge_both_orders(judge, qs, a, b), "pairwise judge, both orders"
    else:
        rm, tok = load_reward_model(judge) if isinstance(judge, str) else judge
        prefs, kind = reward_preferences(rm, tok, qs, a, b, batch_size), "reward model (order-free)"
    out = winrate_stats(prefs, [len(x) for x in a], [len(x) for x in b], n_boot=n_boot, seed=seed)
    out.update({"judge": kind, "prompts": prompts if isinstance(prompts, str) else "custom",
                "answers_a": a, "answers_b": b, "preferences": prefs})  # fmt: skip
    return out


def format_winrate(result: dict[str, Any]) -> str:
    lo, hi = result["winrate_ci95"]
    llo, lhi = result["lc_winrate_ci95"]
    return (
        f"win rate of A over B: {result['winrate']:.3f} (95% CI {lo:.3f}-{hi:.3f}); length-controlled "
        f"{result['lc_winrate']:.3f} (95% CI {llo:.3f}-{lhi:.3f}); n={result['n']}, mean length "
        f"A {result['mean_len_a']:.0f} / B {result['mean_len_b']:.0f} chars; judge: {result['judge']}"
    )


__all__ = ["fit_length_controlled", "pairwise_accuracy", "winrate", "winrate_stats", "load_prompts"]
