"""The verifiable task suite: scorers accept right answers and reject wrong/badly formatted ones; splits are disjoint."""

from __future__ import annotations

import random

import pytest

from llmlab.data.tasks import (
    TASKS,
    evaluate,
    get_task,
    make_preference_pairs,
    make_sft_examples,
    make_test_set,
    score,
    split_of,
)
from llmlab.errors import ConfigError

REQUIRED = {
    "addition",
    "multiplication",
    "reverse",
    "sort",
    "count_letters",
    "count_words",
    "unit_conversion",
    "json",
    "extract",
}


def test_suite_has_the_required_tasks():
    assert REQUIRED <= set(TASKS)
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_scorer_on_right_wrong_and_badly_formatted(name):
    task, rng = get_task(name), random.Random(0)
    for _ in range(50):
        rec = task.sample(rng)
        assert score(name, rec, rec["answer"]) == {"correct": True, "format_ok": True}, rec
        assert score(name, rec, " " + rec["answer"] + "\n") == {"correct": True, "format_ok": True}
        wrong = task.wrong_answer(rec, rng)
        assert wrong != rec["answer"]
        assert score(name, rec, wrong) == {"correct": False, "format_ok": True}, (rec, wrong)
        assert score(name, rec, task.badly_formatted(rec, rng))["format_ok"] is False
        assert score(name, rec, "")["correct"] is False


def test_answers_are_right():
    rng = random.Random(1)
    rec = get_task("addition").sample(rng)
    a, b = (int(x) for x in rec["prompt"].split("What is ")[1].split("?")[0].split(" + "))
    assert rec["answer"] == str(a + b)
    rec = get_task("sort").sample(rng)
    nums = [int(x) for x in rec["prompt"].split(": ")[1].split(".")[0].split(", ")]
    assert rec["answer"] == ", ".join(map(str, sorted(nums)))
    rec = get_task("reverse").sample(rng)
    letters = rec["prompt"].split(": ")[1].split(".")[0].split(" ")
    assert rec["answer"].split() == letters[::-1]
    assert score(
        "unit_conversion",
        {"task": "unit_conversion", "prompt": "Convert 3 km to m.", "answer": "3000"},
        "3000",
    )["correct"]
    assert not score(
        "json", {"prompt": "", "answer": '{"name": "Bob", "age": 30}'}, '{"name": "Bob", "age": "30"}'
    )["format_ok"]


def test_train_and_test_are_disjoint_and_deterministic():
    train = make_sft_examples(3000, seed=0)
    test = make_test_set(30, seed=5)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in test})
    assert all(split_of(r["prompt"]) == "train" for r in train)
    assert all(split_of(r["prompt"]) == "test" for r in test)
    assert {r["task"] for r in test} == set(TASKS)
    assert make_sft_examples(50, seed=3) == make_sft_examples(50, seed=3)
    assert make_sft_examples(50, seed=3) != make_sft_examples(50, seed=4)
    ex = train[0]
    assert ex["messages"] == [
        {"role": "user", "content": ex["prompt"]},
        {"role": "assistant", "content": ex["answer"]},
    ]


def test_preference_pairs_and_evaluate():
    pairs = make_preference_pairs(200, seed=0)
    assert {p["kind"] for p in pairs} == {"wrong", "format"}
    for p in pairs:
        assert score(p["task"], p, p["chosen"]) == {"correct": True, "format_ok": True}
        s = score(p["task"], p, p["rejected"])
        assert not s["correct"] if p["kind"] == "wrong" else not s["format_ok"]
    test = make_test_set(5)
    perfect = evaluate(test, [r["answer"] for r in test])
    assert perfect["exact_match"] == 1.0 and perfect["format_ok"] == 1.0
    half = evaluate(test, [r["answer"] if i % 2 else "no idea" for i, r in enumerate(test)])
    assert 0.3 < half["exact_match"] < 0.7
