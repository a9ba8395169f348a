"""``llmlab rm``, ``rm score``, ``align``, ``ppo``, ``grpo``: help, a tiny run each, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from _align_helpers import chat_tokenizer, tiny_model

from llmlab.cli import main
from llmlab.model.checkpoint import save_checkpoint

FAST = [
    "train.peak_tflops=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plot=false",
    "train.precision=fp32",
]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def ckpt(tmp_path):
    return str(save_checkpoint(tmp_path / "policy", tiny_model(seed=0), chat_tokenizer()))


@pytest.mark.parametrize("cmd", [["rm"], ["rm", "score"], ["align"], ["ppo"], ["grpo"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: llmlab {' '.join(cmd)}")


def test_rm_train_then_score(tmp_path, ckpt, capsys):
    out = tmp_path / "rm"
    code = main(
        [
            "rm",
            "--out",
            str(out),
            f"model={ckpt}",
            "data=tasks",
            "heldout=null",
            "n_heldout=20",
            "max_pairs=100",
            "max_len=96",
            "train.max_steps=3",
            "train.batch_size=8",
            *FAST,
        ]
    )
    assert code == 0
    assert (out / "reward_margins.png").is_file() and json.loads((out / "rm_eval.json").read_text())[
        "accuracy"
    ] >= 0
    capsys.readouterr()
    code = main(
        [
            "rm",
            "score",
            str(out / "final"),
            "--prompt",
            "What is 2 + 2?",
            "--response",
            "4",
            "--response",
            "5",
            "--json",
        ]
    )
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["response"] for x in lines] == ["4", "5"] and all(isinstance(x["reward"], float) for x in lines)


def test_align_dpo_runs(tmp_path, ckpt):
    code = main(
        [
            "align",
            "--loss",
            "dpo",
            "--out",
            str(tmp_path / "dpo"),
            f"model={ckpt}",
            "max_pairs=60",
            "n_heldout=10",
            "max_len=96",
            "train.max_steps=2",
            "train.batch_size=4",
            *FAST,
        ]
    )
    assert code == 0 and (tmp_path / "dpo" / "final" / "model.safetensors").is_file()


def test_grpo_and_ppo_run(tmp_path, ckpt):
    assert (
        main(
            [
                "grpo",
                "--out",
                str(tmp_path / "g"),
                f"model={ckpt}",
                "source=tasks:addition",
                "n_train=20",
                "n_eval=9",
                "group_size=2",
                "prompts_per_step=2",
                "max_new_tokens=4",
                "train.max_steps=1",
                *FAST,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "ppo",
                "--out",
                str(tmp_path / "p"),
                f"model={ckpt}",
                "reward=verifier",
                "source=tasks:addition",
                "n_train=20",
                "n_eval=9",
                "prompts_per_step=2",
                "minibatch=2",
                "ppo_epochs=1",
                "max_new_tokens=4",
                "train.max_steps=1",
                *FAST,
            ]
        )
        == 0
    )
    assert (tmp_path / "p" / "final" / "model.safetensors").is_file()


def test_errors_are_one_line(tmp_path, ckpt, capsys):
    assert main(["align", "--out", str(tmp_path / "x"), "loss=foo"]) == 2
    assert "config key 'loss' must be one of" in capsys.readouterr().err
    assert main(["align", "--out", str(tmp_path / "x"), f"model={ckpt}", "bogus_key=1"]) == 2
    assert "unknown config key 'bogus_key'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a", "rejected": "a"}\n'
    )
    assert (
        main(
            [
                "align",
                "--out",
                str(tmp_path / "y"),
                f"model={ckpt}",
                f"data={bad}",
                "n_heldout=1",
                "train.max_steps=1",
                *FAST,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "bad.jsonl:2:" in err and "identical" in err and len(err.strip().splitlines()) == 1
    assert main(["rm", "score", str(tmp_path / "nope"), "--prompt", "a", "--response", "b"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_align_writes_a_report_and_ends_like_every_training_verb(tmp_path, ckpt, capsys):
    out = tmp_path / "dpo"
    argv = ["align", "--base", ckpt, "--out", str(out), "max_pairs=40", "n_heldout=8", "max_len=96"]
    assert main([*argv, "max_steps=1", "batch_size=4", *FAST]) == 0  # bare keys, as for sft and pretrain
    report = json.loads((out / "align_report.json").read_text())
    assert "val_loss" in report and report["pairs_train"] > 0
    printed = capsys.readouterr().out
    assert f"run:    {out}" in printed and f"report: {out / 'align_report.json'}" in printed
    assert f"next:   llmlab chat {out}" in printed
    # The same command again would write over that run: refused, until --overwrite says so.
    assert main([*argv, "max_steps=1", "batch_size=4", *FAST]) == 2
    assert "holds a previous run" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "max_steps=1", "batch_size=4", *FAST]) == 0
