"""Task files and formats: the instruction-record parser on real records, lm-eval's prompt formats and
metrics, GSM8K's two answer filters, generative tasks through the engine, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from _interop_helpers import tiny_tokenizer

from llmlab.errors import ConfigError
from llmlab.eval import evaluate, pass_at_k
from llmlab.eval.gen_tasks import GEN_BUILDERS, score_gsm8k
from llmlab.eval.mc_tasks import MC_BUILDERS
from llmlab.eval.metrics import extract_flexible, extract_letter, extract_strict, mc_scores, mean_stderr
from llmlab.eval.records import EVAL_ASSETS, MalformedRecord, parse_choice_record, read_json_records
from llmlab.eval.task_list import TASKS
from llmlab.model import ModelConfig, Transformer
from llmlab.model.checkpoint import save_checkpoint


@pytest.mark.parametrize(
    "name", ["arc_easy", "arc_challenge", "boolq", "piqa", "social_iqa", "winogrande", "openbookqa"]
)
def test_every_shipped_record_parses(name):
    recs, bad = read_json_records(EVAL_ASSETS / f"{name}_test.json.gz")
    assert not bad and len(recs) == TASKS[name].size
    parsed = [parse_choice_record(r, w) for w, r in recs]
    for p in parsed:
        assert p["question"] and all(p["options"]) and "Answer" not in " ".join(p["options"])


def test_parser_on_known_records():
    recs, _ = read_json_records(EVAL_ASSETS / "arc_easy_test.json.gz")
    p = parse_choice_record(recs[1][1], recs[1][0])
    assert p == {
        "question": "Which piece of safety equipment is used to keep mold spores from entering the respiratory system?",
        "options": ["safety goggles", "breathing mask", "rubber gloves", "lead apron"],
        "gold": 1,
    }
    recs, _ = read_json_records(EVAL_ASSETS / "winogrande_test.json.gz")
    p = parse_choice_record(recs[0][1], recs[0][0])
    assert p["options"] == ["Sarah", "Maria"] and p["gold"] == 1 and "_" in p["question"]
    recs, _ = read_json_records(EVAL_ASSETS / "boolq_test.json.gz")
    assert parse_choice_record(recs[0][1], "x") == {
        "question": "does ethanol take more energy make that produces?",
        "options": [],
        "gold": "false",
    }
    with pytest.raises(MalformedRecord, match="f.json:#3: .*Answer2"):
        parse_choice_record(
            {"instruction": "Please choose the correct answer to the question: Q\n\nAnswer1: a\n\n"
             "Answer format: answer1/answer2", "answer": "answer1"}, "f.json:#3")  # fmt: skip


def test_lm_eval_prompt_formats():
    arc = MC_BUILDERS["arc_easy"]()[0][1]
    assert arc.requests[0] == ("Question: Which piece of safety equipment is used to keep mold spores from entering "
                               "the respiratory system?\nAnswer:", " safety goggles")  # fmt: skip
    wino = MC_BUILDERS["winogrande"]()[0][0]
    assert wino.requests == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]  # fmt: skip
    boolq = MC_BUILDERS["boolq"]()[0][0]
    assert boolq.requests[0] == (
        "Question: does ethanol take more energy make that produces?\nAnswer:",
        " no",
    )
    assert boolq.gold == 0
    siqa = MC_BUILDERS["social_iqa"]()[0][0]
    assert siqa.requests[0][0].startswith("Q: Tracy didn't go home") and siqa.requests[0][0].endswith("\nA:")
    mmlu = MC_BUILDERS["mmlu"](2)[0][0]
    ctx = mmlu.requests[0][0]
    assert ctx.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    )
    assert ctx.count("\nAnswer:") == 3 and ctx.endswith("\nD. 6\nAnswer:") and mmlu.choices == list("ABCD")
    mc1, mc2 = MC_BUILDERS["truthfulqa_mc1"]()[0][0], MC_BUILDERS["truthfulqa_mc2"]()[0][0]
    assert mc1.choices[0] == "The watermelon seeds pass through your digestive system" and mc1.gold == 0
    assert mc2.n_true == 5 and mc2.requests[0][0].endswith(
        "\n\nQ: What happens to you if you eat watermelon seeds?\nA:"
    )


def test_mc_metrics_match_lm_eval_definitions():
    # acc picks the highest sum; acc_norm divides by characters: "bb" (len 2) at -3 beats "a" at -2.
    assert mc_scores([-2.0, -3.0], ["a", "bb"], gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    mc2 = mc_scores([-1.0, -2.0, -1.0], ["x", "y", "z"], gold=0, n_true=2)["mc2"]
    import math

    p = [math.exp(-1), math.exp(-2), math.exp(-1)]
    assert mc2 == pytest.approx((p[0] + p[1]) / sum(p))
    assert mean_stderr([1, 0, 1, 0]) == pytest.approx((1 / 3) ** 0.5 / 2)


def test_pass_at_k_is_chen_et_al():
    assert pass_at_k(10, 0, 1) == 0 and pass_at_k(10, 10, 5) == 1
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - (3 * 2) / (5 * 4))


def test_gsm8k_filters_like_lm_eval():
    text = "She has 3 + 4 = 7 apples.\n#### 7\n\nQuestion: next one has 12"
    assert extract_strict(text) == "7" and extract_flexible(text) == "12"
    assert score_gsm8k(text, "blah\n#### 7") == {"exact_match_strict": 1.0, "exact_match_flexible": 0.0}
    assert score_gsm8k("The answer is $1,200.", "x #### 1200")["exact_match_flexible"] == 1.0
    assert score_gsm8k("no number", "#### 3") == {"exact_match_strict": 0.0, "exact_match_flexible": 0.0}
    assert extract_letter("The answer is (C).") == "C" and extract_letter("answer: B") == "B"


def test_gsm8k_prompt_and_exemplar_pool():
    docs, bad = GEN_BUILDERS["gsm8k"](2, False)
    assert not bad and len(docs) == 1319
    assert (
        docs[0].prompt.startswith("Question: Jen and Tyler are gymnasts")
        and docs[0].prompt.count("Question:") == 3
    )
    assert docs[0].prompt.endswith("\nAnswer:") and docs[0].stop == ["Question:", "</s>", "<|im_end|>"]
    chat = GEN_BUILDERS["gsm8k"](None, True)[0][0]
    assert isinstance(chat.prompt, list) and chat.prompt[0]["content"].count("Question:") == 1
    with pytest.raises(ConfigError, match="--shots 9999: the GSM8K train pool has only 7473"):
        GEN_BUILDERS["gsm8k"](9999, False)


def test_gsm8k_exemplars_are_drawn_as_lm_eval_draws_them():
    """lm-eval 0.4.13's contexts for the first 4 test documents at 5 shots (its default sampler, seed 1234),
    as GSM8K train line numbers, recorded from lm-eval itself (bench/lm_eval_compare.py's gsm8k task)."""
    import gzip
    import json

    from llmlab.eval.gen_tasks import GSM8K_TRAIN

    lm_eval_picks = [
        [6374, 3610, 957, 61, 742],
        [7462, 6610, 4769, 286, 5501],
        [5677, 687, 806, 6279, 2905],
        [1939, 142, 252, 6461, 129],
    ]
    pool = [json.loads(line) for line in gzip.open(GSM8K_TRAIN, "rt")]
    docs, _ = GEN_BUILDERS["gsm8k"](5, False)
    for doc, picks in zip(docs, lm_eval_picks):
        shots = "".join(f"Question: {pool[i]['question']}\nAnswer: {pool[i]['answer']}\n\n" for i in picks)
        assert doc.prompt.startswith(shots)


def _tiny():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=128)
    )
    return model.eval(), tok


def test_generative_tasks_run_on_the_engine_and_truncate_long_prompts():
    model, tok = _tiny()
    out = evaluate(model, tasks=["gsm8k", "aqua", "task_suite"], limit=2, tokenizer=tok, progress=False)
    res = out["results"]
    assert set(res["gsm8k"]) >= {"exact_match", "exact_match_strict", "exact_match_flexible", "n"}
    assert res["gsm8k"]["n"] == 2 and res["gsm8k"]["truncated"] == 2  # 5-shot prompts >> 128 tokens
    assert res["aqua"]["exact_match"] in (0.0, 0.5, 1.0) and res["task_suite"]["n"] == 2


def test_bad_input_is_one_clear_error():
    model, tok = _tiny()
    with pytest.raises(ConfigError, match=r"unknown task 'arc_eazy' \(known tasks: arc_easy, arc_challenge"):
        evaluate(model, tasks=["arc_eazy"], tokenizer=tok)
    with pytest.raises(ConfigError, match="--shots 6: mmlu abstract_algebra has only 5 dev exemplars"):
        evaluate(model, tasks=["mmlu"], shots=6, tokenizer=tok)
    with pytest.raises(ConfigError, match="tokenizer="):
        evaluate(model, tasks=["arc_easy"])


def test_cli_list_and_unknown_task():
    r = subprocess.run(
        [sys.executable, "-m", "llmlab", "eval", "list", "--json"], capture_output=True, text=True
    )
    assert r.returncode == 0 and json.loads(r.stdout)["humaneval"]["metrics"][0] == "pass@1"
    r = subprocess.run([sys.executable, "-m", "llmlab", "eval", "run", "x", "--tasks", "nope"], capture_output=True,
                       text=True)  # fmt: skip
    assert (
        r.returncode == 2 and "unknown task 'nope' (known tasks:" in r.stderr and "Traceback" not in r.stderr
    )


def test_cli_run_writes_the_documented_json(tmp_path):
    model, tok = _tiny()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "llmlab", "eval", "run", str(tmp_path / "ckpt"), "--tasks", "arc_easy,piqa",
           "--limit", "3", "--no-progress", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "arc_easy" in r.stdout and "acc_norm" in r.stdout and "± stderr" in r.stdout
    res = json.loads(out.read_text())
    assert set(res) == {"results", "config"} and res["config"]["limit"] == 3
    for task in ("arc_easy", "piqa"):
        assert res["results"][task]["n"] == 3 and 0 <= res["results"][task]["acc_norm"] <= 1
