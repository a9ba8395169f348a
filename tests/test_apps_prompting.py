"""llmlab.apps.prompting: builders through real chat templates, exemplar selection, the majority vote,
schema-constrained JSON on a real (tiny random) model, the eval grid end to end, and the CLI's bad input."""

from __future__ import annotations

import json
import re

import _infer_helpers as H
import numpy as np
import pytest

from llmlab.apps.prompting import (
    COT_TRIGGER,
    Exemplar,
    ExemplarSelector,
    build,
    evaluate_prompting,
    few_shot,
    generate_json,
    gsm8k_pool,
    majority_vote,
    parse_number,
    zero_shot,
    zero_shot_cot,
)
from llmlab.apps.prompting.ask import answer_key
from llmlab.apps.prompting.evaluate import PERSON_SCHEMA, load_task
from llmlab.cli import main
from llmlab.errors import ConfigError, LLMLabError
from llmlab.infer import LLM, SamplingParams

one_thread = pytest.fixture(scope="module", autouse=True)(H.one_thread)
SHOTS = [
    Exemplar("What is 2 + 3?", "5", "2 plus 3 is 5."),
    Exemplar("What is 4 * 2?", "8", "4 times 2 is 8."),
]


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_gguf):
    from llmlab.interop.gguf import open_gguf, tokenizer_from_gguf

    return tokenizer_from_gguf(open_gguf(smollm2_gguf), str(smollm2_gguf))


@pytest.fixture(scope="module")
def tiny_llm():
    return LLM.from_model(H.model(max_seq_len=1024), H.tokenizer(), max_batch_size=16, seed=0)


# ------------------------------------------------------------------------------------------- builders
def test_zero_and_few_shot_render_through_smollm2_template(smol_tokenizer):
    text = zero_shot("How many legs has a cat?", "Answer with the number only.", system="Be brief.").render(
        smol_tokenizer
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow many legs has a cat?\n"
        "Answer with the number only.<|im_end|>\n<|im_start|>assistant\n"
    )
    # Without a system message SmolLM2's template adds its own default one.
    assert "named SmolLM" in zero_shot("Hi?").render(smol_tokenizer)
    few = few_shot("What is 7 + 1?", SHOTS, "Answer with the number only.").render(smol_tokenizer)
    turns = re.findall(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", few, flags=re.S)
    assert [role for role, _ in turns] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert turns[1][1] == "What is 2 + 3?\nAnswer with the number only." and turns[2][1] == "5"
    assert turns[4][1] == "8" and turns[5][1].startswith("What is 7 + 1?")


def test_few_shot_cot_and_zero_shot_cot(smol_tokenizer):
    cot = few_shot("What is 7 + 1?", SHOTS, 'End with "The answer is N."', cot=True).render(smol_tokenizer)
    assert "2 plus 3 is 5.\nThe answer is 5.<|im_end|>" in cot and "4 times 2 is 8.\nThe answer is 8." in cot
    with pytest.raises(LLMLabError, match="no worked solution"):
        few_shot("q?", [Exemplar("What?", "1")], cot=True)
    prompt = zero_shot_cot("What is 7 + 1?")
    assert prompt.render(smol_tokenizer).endswith("<|im_start|>assistant\nLet's think step by step.")
    assert build("self-consistency", "What is 7 + 1?").assistant_prefix == COT_TRIGGER
    with pytest.raises(LLMLabError, match="unknown technique"):
        build("tree-of-thought", "q?")


def test_cot_prefix_tokens_follow_the_generation_prompt(tiny_llm):
    prompt = zero_shot_cot("Tom has 3 apples.")
    ids = prompt.engine_prompt(tiny_llm)
    _, head = tiny_llm.encode_prompt(prompt.messages)
    assert ids[: len(head)] == head and len(ids) > len(head)
    assert tiny_llm.tokenizer.decode(ids[len(head) :]) == COT_TRIGGER
    assert (
        zero_shot("Hi?").engine_prompt(tiny_llm) == zero_shot("Hi?").messages
    )  # no prefix: the engine encodes


# ------------------------------------------------------------------------------------------ exemplars
def test_gsm8k_pool_splits_solution_and_answer():
    first = gsm8k_pool(3)[0]
    assert first.question.startswith("Natalia sold clips") and first.answer == "72"
    assert "<<" not in first.rationale and "####" not in first.rationale and "48/2 = 24" in first.rationale


def test_random_selection_is_seeded_and_disjoint_from_scored_questions():
    pool = gsm8k_pool(300)
    scored = [e.question for e in pool[:100]]  # pretend these are the scored questions
    a = ExemplarSelector(pool, 4, "random", seed=1, exclude=scored)
    b = ExemplarSelector(pool, 4, "random", seed=1, exclude=scored)
    c = ExemplarSelector(pool, 4, "random", seed=2, exclude=scored)
    assert a.select("any?") == b.select("other?") and a.select("x") != c.select("x")
    for sel in (a, c):
        assert not {e.question for e in sel.select("x")} & set(scored) and len(sel.select("x")) == 4
    with pytest.raises(ConfigError, match="only 200 usable"):
        ExemplarSelector(pool, 201, exclude=scored)


def test_similar_selection_picks_nearest_and_never_the_question_itself():
    words = ["apple", "train", "money", "dog"]

    def embed(texts):  # bag of words over a tiny vocabulary: similarity = shared topic words
        return np.array([[t.lower().count(w) + 1e-3 for w in words] for t in texts], dtype=np.float32)

    pool = [
        Exemplar(q, "1") for q in ("apple apple pie", "a train ride", "money money bank", "dog walk", "q?")
    ]
    sel = ExemplarSelector(pool, 2, "similar", embed=embed, exclude=["q?"])
    picked = sel.select("How much money for an apple?")
    assert {e.question for e in picked} == {"apple apple pie", "money money bank"}
    assert sel.select("the train ride")[-1].question == "a train ride"  # most similar next to the question
    with pytest.raises(ConfigError, match="needs an embedder"):
        ExemplarSelector(pool, 2, "similar")


def test_load_task_math_fields():
    spec = load_task("multiarith", 5)
    assert len(spec.problems) == 5 and spec.problems[0].answer == "15.0"
    assert spec.correct(spec.problems[0], spec.key(spec.problems[0], "So he bought 15 new books."))
    assert not spec.correct(spec.problems[0], spec.key(spec.problems[0], "The answer is 16."))


# ---------------------------------------------------------------------------------- self-consistency
def test_majority_vote_and_margin():
    v = majority_vote(["8.0", "8.0", "9.0", None, "8.0"])
    assert (v.answer, v.count, v.n, v.margin) == ("8.0", 3, 5, pytest.approx(0.4))
    tie = majority_vote(["a", "b", "b", "a"])  # 2-2: the first to reach 2 wins, margin 0
    assert (tie.answer, tie.margin) == ("b", 0.0)
    assert majority_vote(["x", "x"]).margin == 1.0
    assert majority_vote([None, None]) == majority_vote([None, None]) and majority_vote([None]).answer is None
    assert parse_number("So she pays $1,200.") == parse_number("The answer is 1200") == "1200.0"
    assert answer_key("The answer is Paris.") == "paris" and answer_key("") is None


# ------------------------------------------------------------------------------------------- JSON
def test_constrained_json_always_parses_against_the_schema(tiny_llm):
    prompts = [zero_shot(f"Describe person {i} as JSON.").messages for i in range(6)]
    sampled = SamplingParams(temperature=1.0, max_tokens=128, seed=3)  # room for 20 multi-byte chars
    replies = generate_json(tiny_llm, prompts, PERSON_SCHEMA, constrained=True, params=sampled)
    for r in replies:
        assert r.error is None, r.text
        assert set(r.value) == {"name", "age"} and isinstance(r.value["name"], str)
        assert isinstance(r.value["age"], int) and 0 <= r.value["age"] <= 150 and len(r.value["name"]) <= 20
    free = generate_json(tiny_llm, prompts, PERSON_SCHEMA, constrained=False, params=sampled)
    assert any(r.error is not None for r in free)  # a random model does not write JSON on its own


# ----------------------------------------------------------------------------------------- eval grid
def test_eval_grid_on_tiny_model(tiny_llm):
    result = evaluate_prompting(tiny_llm, ["addsub", "task_suite"], ["zero", "fewshot", "cot", "fewshot-cot", "self-consistency"],
                                limit=2, k=1, sc_samples=(1, 3), max_tokens=4, cot_max_tokens=4)  # fmt: skip
    cells = {(c["task"], c["technique"], c["samples"]): c for c in result["cells"]}
    # The task suite has no worked solutions: its fewshot-cot cell is skipped (and so is the pooled row).
    assert ("addsub", "fewshot-cot", 1) in cells and result["config"]["skipped"] == ["task_suite/fewshot-cot"]
    cells = {key: c for key, c in cells.items() if key[1] != "fewshot-cot"}
    assert set(cells) == {(t, m, n) for t in ("addsub", "task_suite", "all") for m, n in
                          [("zero", 1), ("fewshot", 1), ("cot", 1), ("self-consistency", 1),
                           ("self-consistency", 3)]}  # fmt: skip
    sc1, sc3 = cells["addsub", "self-consistency", 1], cells["addsub", "self-consistency", 3]
    assert sc1["n"] == sc3["n"] == 2 and 0 < sc1["generated_tokens"] < sc3["generated_tokens"] <= 3 * 2 * 4
    assert cells["task_suite", "zero", 1]["n"] == 9  # ceil(2 / 9) = 1 problem per verifiable task
    pooled = cells["all", "self-consistency", 3]  # both tasks' questions together
    suite_sc = cells["task_suite", "self-consistency", 3]
    assert cells["all", "zero", 1]["n"] == 2 + 9 and suite_sc["n"] == 2  # self-consistency: first sc_limit
    assert (
        pooled["n"] == 2 + 2
        and pooled["generated_tokens"] == sc3["generated_tokens"] + suite_sc["generated_tokens"]
    )
    few, zero = cells["addsub", "fewshot", 1], cells["addsub", "zero", 1]
    assert few["prompt_tokens"] > zero["prompt_tokens"]  # the exemplar turns are in the prompt
    for c in result["cells"]:
        assert 0.0 <= c["ci95"][0] <= c["accuracy"] <= c["ci95"][1] <= 1.0


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "argv, message",
    [
        (["prompt", "eval", "m", "--tasks", "svamp,nope"], "--tasks 'svamp,nope': unknown nope"),
        (["prompt", "eval", "m", "--techniques", "zero,magic"], "unknown magic"),
        (["prompt", "eval", "m", "--n", "1,x"], "--n '1,x': expected a comma list"),
        (["prompt", "eval", "m", "--limit", "0"], "--limit 0"),
        (["prompt", "m", "q?", "--k", "-1"], "--k -1"),
        (["prompt", "m", "q?", "--json-schema", "/nonexistent.json"], "--json-schema /nonexistent.json"),
        (["prompt", "ask", "m", "  "], "QUESTION is empty"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("llmlab prompt: error:")


def test_cli_bad_schema_file_names_the_line(tmp_path, capsys):
    bad = tmp_path / "s.json"
    bad.write_text('{"type": "object",\n "properties": }')
    assert main(["prompt", "m", "q?", "--json-schema", str(bad)]) == 2
    assert f"--json-schema {bad}:2: not JSON" in capsys.readouterr().err
    schema = tmp_path / "ok.json"
    schema.write_text(json.dumps(PERSON_SCHEMA))
    from llmlab.apps.prompting import read_schema

    assert read_schema(schema) == PERSON_SCHEMA
