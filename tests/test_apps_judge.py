"""llmlab.apps.judge (RLAIF pairwise judge, both orders) and llmlab.apps.constitutional (critique -> revise),
on a real tiny random model and the shipped constitution."""

from __future__ import annotations

import json

import _infer_helpers as H
import pytest

from llmlab.align.data import load_pairs
from llmlab.apps.constitutional import CONSTITUTION, critique_revise, load_constitution, write_jsonl
from llmlab.apps.judge import Judge, Judgement, agreement, label_pairs, request_text, summarize
from llmlab.errors import ConfigError, LLMLabError
from llmlab.infer import LLM

one_thread = pytest.fixture(scope="module", autouse=True)(H.one_thread)


@pytest.fixture(scope="module")
def tiny_llm():
    return LLM.from_model(H.model(max_seq_len=1024), H.tokenizer(), max_batch_size=16, seed=0)


def test_judgement_debiasing_and_consistency():
    fair = Judgement(p_ab=0.9, p_ba=0.2)  # x wins in both orders
    assert fair.p == pytest.approx(0.85) and fair.consistent
    biased = Judgement(p_ab=0.8, p_ba=0.7)  # "the first one" whatever it is: the verdict flips with the order
    assert biased.p == pytest.approx(0.55) and not biased.consistent
    assert not Judgement(0.5, 0.5).consistent and Judgement(0.5, 0.5).p == 0.5


def test_summarize_known_judgements():
    js = [Judgement(0.9, 0.2), Judgement(0.8, 0.7), Judgement(0.3, 0.6), Judgement(0.6, 0.9)]
    s = summarize(js, truth_first=[True, True, False, True])
    assert s["n"] == 4 and s["self_agreement"] == 0.5  # first and third survive the swap
    assert s["first_position_rate"] == 6 / 8  # p_ab > .5: 3 of 4; p_ba > .5: 3 of 4
    # debiased p: .85, .55, .35, .35 -> verdicts x, x, y, y; truth x, x, y, x -> 3 of 4
    assert s["agreement"] == 0.75 and s["agreement_single_order"] == 1.0
    lo, hi = s["agreement_ci95"]
    assert lo < 0.75 < hi
    with pytest.raises(LLMLabError, match="no pairs"):
        summarize([])


def test_judge_reads_letter_probabilities_in_both_orders(tiny_llm):
    judge = Judge(tiny_llm)
    prompts, xs, ys = ["What is 2+2?", "Say hi."], ["4", "hi"], ["5", "go away"]
    single = judge.first_better(prompts, xs, ys)
    swapped = judge.first_better(prompts, ys, xs)
    assert all(0.0 < p < 1.0 for p in single + swapped)
    both = judge.compare(prompts, xs, ys)
    assert [j.p_ab for j in both] == pytest.approx(single) and [j.p_ba for j in both] == pytest.approx(
        swapped
    )
    records = label_pairs(judge, prompts, xs, ys)
    for rec, j, x, y in zip(records, both, xs, ys, strict=True):
        assert (rec["chosen"], rec["rejected"]) == ((x, y) if j.p > 0.5 else (y, x))
        assert rec["margin"] == pytest.approx(abs(2 * j.p - 1), abs=1e-4)
    assert label_pairs(judge, prompts, xs, ys, min_margin=1.0) == []  # nothing is that sure


def test_agreement_on_shipped_pairs_balances_the_order(tiny_llm):
    pairs = load_pairs("tasks", limit=6)
    s = agreement(Judge(tiny_llm), pairs)
    assert s["n"] == 6 and 0.0 <= s["agreement"] <= 1.0 and "self_agreement" in s


def test_request_text_and_bad_rubric(tiny_llm):
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "how?"}]  # fmt: skip
    assert request_text(convo) == "User: hi\nAssistant: hello\nUser: how?"
    assert request_text([{"role": "user", "content": "only"}]) == "only"
    with pytest.raises(LLMLabError, match="unknown placeholder"):
        Judge(tiny_llm, rubric="{question} {first}").first_better(["q"], ["a"], ["b"])


def test_constitution_file_and_errors(tmp_path):
    principles = load_constitution()
    assert len(principles) >= 3 and all(p.critique and p.revision for p in principles)
    assert CONSTITUTION.is_file()
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"principles": [{"name": "x", "critique": "c"}]}))
    with pytest.raises(ConfigError, match=r"principles\[0\] needs"):
        load_constitution(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_constitution(tmp_path / "missing.json")


def test_critique_revise_writes_pairs_align_reads(tiny_llm, tmp_path):
    prompts = [[{"role": "user", "content": f"Tell me about the sea {i}."}] for i in range(3)]
    out = critique_revise(tiny_llm, prompts, max_tokens=12, seed=1)
    stats = out["stats"]
    assert stats["prompts"] == 3 and stats["pairs"] + stats["dropped"] == 3 and len(out["records"]) == 3
    assert 0 < stats["tokens_generated"] <= 3 * 3 * 12
    for rec in out["records"]:
        assert rec["principle"] in {p.name for p in load_constitution()}
    if out["pairs"]:
        path = tmp_path / "cai_pairs.jsonl"
        write_jsonl(path, out["pairs"])
        loaded = load_pairs(path)
        assert loaded[0].chosen == out["pairs"][0]["chosen"].strip()
        assert out["sft"][0]["messages"][-1] == {"role": "assistant", "content": out["pairs"][0]["chosen"]}


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["judge", "m", "--label", "/nonexistent.jsonl", "--out", "x.jsonl"],
            "/nonexistent.jsonl: cannot read",
        ),
        (["judge", "m", "--pairs", "tasks", "--limit", "0"], "--limit 0"),
        (["judge", "m", "--label", "a.jsonl"], "--label needs --out"),
        (["cai", "m", "--out", "OUT", "--limit", "0"], "--limit 0"),
        (
            ["cai", "m", "--out", "OUT", "--constitution", "/nope.json"],
            "/nope.json: cannot read the constitution",
        ),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    from llmlab.cli import main

    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_cli_label_file_names_the_bad_line(tmp_path, capsys):
    from llmlab.cli import main

    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "q", "a": "x", "b": "y"}\n{"prompt": "q", "a": "x"}\n')
    assert main(["judge", "m", "--label", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}:2: missing field 'b'" in capsys.readouterr().err
