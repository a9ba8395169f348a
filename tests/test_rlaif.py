"""``llmlab align --feedback ai`` (RLAIF, llmlab.apps.rlaif): pairs sampled from a tiny policy, labelled by a
tiny judge in both orders, written as preference JSONL that DPO and the reward model train on; one-line errors
for a judge that cannot render the rubric and for bad options."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _align_helpers import chat_tokenizer, tiny_model

from llmlab.align.data import load_pairs
from llmlab.apps.judge import Judge
from llmlab.apps.rlaif import FEEDBACK_FILE, STATS_FILE
from llmlab.cli import main
from llmlab.infer import LLM
from llmlab.model.checkpoint import load_checkpoint, save_checkpoint

FAST = ["train.peak_tflops=1", "train.progress=false", "train.tensorboard=false", "train.plot=false",
        "train.precision=fp32"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny policy and a tiny judge (a longer context: the rubric with two answers exceeds 128 tokens)."""
    root = tmp_path_factory.mktemp("rlaif")
    policy = save_checkpoint(root / "policy", tiny_model(seed=0), chat_tokenizer())
    judge = save_checkpoint(root / "judge", tiny_model(seed=1, max_seq_len=1024), chat_tokenizer())
    return str(policy), str(judge)


def _align(out, policy, judge, *extra):
    return main(["align", "--feedback", "ai", "--base", policy, "--judge", judge, "--prompts", "tasks",
                 "--n-prompts", "12", "--sample-tokens", "8", "--min-margin", "0", "--out", str(out),
                 "max_len=96", "n_heldout=2", "train.max_steps=2", "train.batch_size=4", *FAST, *extra])  # fmt: skip


@pytest.fixture(scope="module")
def labels(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "run"
    assert _align(out, *models, "--labels-only") == 0
    return out


def test_labels_are_the_judges_both_order_verdicts(labels, models):
    records = [json.loads(line) for line in (labels / FEEDBACK_FILE).read_text().splitlines()]
    stats = json.loads((labels / STATS_FILE).read_text())
    assert stats["prompts"] == 12 and stats["kept"] == len(records) >= 2
    assert stats["kept"] + stats["dropped_identical"] + stats["dropped_too_close"] == 12
    assert 0.0 <= stats["judge_self_agreement"] <= 1.0 and 0.0 <= stats["judge_first_position_rate"] <= 1.0
    assert stats["policy_tokens"] > 0 and stats["judge_tokens"] == 2 * 12  # one letter per order
    assert not (labels / "align_report.json").exists()  # --labels-only stops before DPO
    # Judged again, every kept pair prefers its chosen answer, by the recorded margin.
    model, tok = load_checkpoint(models[1])
    judge = Judge(LLM.from_model(model, tok, max_batch_size=16))
    again = judge.compare([r["prompt"] for r in records], [r["chosen"] for r in records],
                          [r["rejected"] for r in records])  # fmt: skip
    for rec, j in zip(records, again, strict=True):
        assert rec["chosen"] != rec["rejected"] and j.p > 0.5
        assert rec["margin"] == pytest.approx(2 * j.p - 1, abs=1e-4)
    assert len(load_pairs(labels / FEEDBACK_FILE)) == len(records)  # what align/rm read


def test_labels_train_the_reward_model(labels, models, tmp_path):
    out = tmp_path / "rm"
    code = main(["rm", "--base", models[0], f"data={labels / FEEDBACK_FILE}", "heldout=null", "n_heldout=2",
                 "max_len=96", "train.max_steps=2", "train.batch_size=2", "--out", str(out), *FAST])  # fmt: skip
    assert code == 0
    report = json.loads((out / "rm_eval.json").read_text())
    assert report["pairs_train"] + report["pairs_heldout"] == len(load_pairs(labels / FEEDBACK_FILE))


def test_align_feedback_ai_end_to_end(models, tmp_path):
    out = tmp_path / "dpo"
    assert _align(out, *models) == 0
    report = json.loads((out / "align_report.json").read_text())
    kept = report["ai_feedback"]["kept"]
    assert kept == len((out / FEEDBACK_FILE).read_text().splitlines())
    assert report["pairs_train"] + report["pairs_heldout"] == kept and (out / "ckpt-0000002").is_dir()
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ raise_exception('this model takes no user turns') }}", "this model takes no user turns"),
        (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>{% endfor %}",
            "lacks the rubric's text",
        ),
    ],
)
def test_judge_that_cannot_render_the_rubric_is_one_line(models, tmp_path, capsys, template, message):
    tok = copy.copy(chat_tokenizer())
    tok.chat_template = template
    bad = save_checkpoint(tmp_path / "bad-judge", tiny_model(seed=2), tok)
    assert _align(tmp_path / "out", models[0], str(bad)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--judge {bad}" in err and "cannot render the rubric" in err and message in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n-prompts", "0"], "--n-prompts 0"),
        (["--min-margin", "1.5"], "--min-margin 1.5"),
        (["--prompts", "/nonexistent.jsonl"], "--prompts /nonexistent.jsonl: cannot read"),
        (["--min-margin", "0.999999"], "passed --min-margin"),
    ],
)
def test_bad_options_are_one_line(models, tmp_path, capsys, extra, message):
    assert _align(tmp_path / "out", *models, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_prompts_file_names_the_bad_line(models, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Add 2 and 3."}\n{"prompt": ""}\n')
    assert _align(tmp_path / "out", *models, "--prompts", str(prompts)) == 2
    assert f"{prompts}:2: needs a non-empty 'prompt'" in capsys.readouterr().err
