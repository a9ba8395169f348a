"""Win rates: length control removes a preference that only follows length, a pairwise judge asked in both
orders loses its position bias, and reward-model verdicts are Bradley-Terry probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _interop_helpers import tiny_tokenizer

from llmlab.align.data import PreferencePair
from llmlab.align.reward_model import RewardModel, score_responses
from llmlab.eval import pairwise_accuracy, winrate
from llmlab.eval.judging import judge_both_orders, load_prompts, winrate_stats
from llmlab.model import ModelConfig


def test_length_controlled_winrate_removes_a_length_only_preference():
    rng = np.random.default_rng(0)
    len_b = rng.integers(100, 400, 200)
    len_a = len_b + rng.normal(120, 150, 200).astype(int)  # A tends to be longer
    d = (len_a - len_b).astype(float)
    prefs = 1 / (1 + np.exp(-3 * np.tanh(d / d.std())))  # the judge only rewards length
    out = winrate_stats(prefs, len_a, len_b, n_boot=200)
    assert out["winrate"] > 0.65
    assert out["lc_winrate"] == pytest.approx(0.5, abs=1e-3)
    lo, hi = out["lc_winrate_ci95"]
    assert lo < 0.5 < hi and out["winrate_ci95"][0] > 0.6


def test_pairwise_judge_in_both_orders_cancels_position_bias():
    always_first = lambda q, first, second: 0.9  # noqa: E731
    assert judge_both_orders(always_first, ["q"] * 3, ["a"] * 3, ["b"] * 3) == [pytest.approx(0.5)] * 3
    prefers_a = lambda q, first, second: 0.8 if first == "good" else 0.2  # noqa: E731
    assert judge_both_orders(prefers_a, ["q"], ["good"], ["bad"]) == [pytest.approx(0.8)]


def _rm():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=128)
    return RewardModel(cfg).eval(), tok


def test_reward_model_winrate_and_pairwise_accuracy():
    rm, tok = _rm()
    prompts = load_prompts("vicuna", limit=4)
    assert (
        len(prompts) == 4 and len(load_prompts("alpaca_eval")) == 805 and len(load_prompts("mt_bench")) == 80
    )
    a = ["hello world", "a small test", "héllo", "world world world"]
    b = ["test", "hello", "a small world test", "wörld"]
    out = winrate(None, None, judge=(rm, tok), prompts=prompts, answers_a=a, answers_b=b, n_boot=50)
    convs = [[{"role": "user", "content": q}] for q in prompts]
    ra, rb = score_responses(rm, tok, convs, a), score_responses(rm, tok, convs, b)
    expect = [1 / (1 + np.exp(-(x - y))) for x, y in zip(ra, rb, strict=True)]
    assert out["preferences"] == pytest.approx(expect, abs=1e-6) and out["n"] == 4
    swapped = winrate(None, None, judge=(rm, tok), prompts=prompts, answers_a=b, answers_b=a, n_boot=50)
    assert swapped["winrate"] == pytest.approx(1 - out["winrate"], abs=1e-6)
    pairs = [PreferencePair(c, x, y, f"t:{i}") for i, (c, x, y) in enumerate(zip(convs, a, b, strict=True))]
    acc = pairwise_accuracy((rm, tok), pairs)
    assert acc["accuracy"] == pytest.approx(np.mean([x > y for x, y in zip(ra, rb, strict=True)]))
