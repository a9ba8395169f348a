"""Knowledge distillation: the KD loss against its formula and torch's kl_div, the layer-copy student, and a
tiny end-to-end ``llmlab distill`` run whose student is then used as a speculative-decoding draft."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _align_helpers import chat_tokenizer, tiny_model

from llmlab.cli import main
from llmlab.distill.student import student_from_teacher
from llmlab.errors import ConfigError
from llmlab.losses import kd_loss
from llmlab.model.checkpoint import save_checkpoint
from llmlab.recipes.distill import load_distill_config


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------- kd_loss
def test_kd_loss_matches_a_hand_computation():
    s, t, T = [1.0, 0.0, -1.0], [0.0, 2.0, 0.0], 2.0

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(x / T) for x in z]
        return [x / sum(e) for x in e]

    p, q = softmax(t), softmax(s)
    want = T**2 * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    got = kd_loss(torch.tensor([[s]]), torch.tensor([[t]]), temperature=T)
    assert got.shape == (1, 1)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # Mixing in the hard label (token 2) at T = 1: alpha * -log softmax(s)[2].
    ce = -(s[2] - math.log(sum(math.exp(x) for x in s)))
    mixed = kd_loss(torch.tensor([[s]]), torch.tensor([[t]]), T, labels=torch.tensor([[2]]), alpha=0.25)
    assert float(mixed) == pytest.approx(0.75 * want + 0.25 * ce, rel=1e-6)


def test_kd_loss_matches_torch_kl_div_with_a_mask():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    mask = torch.rand(2, 5, generator=g) > 0.3
    T = 1.7
    ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none")
    ref = ref.sum(-1) * T**2 * mask
    got = kd_loss(s, t, T, mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert bool((got[~mask] == 0).all())
    # Zero exactly when the student equals the teacher; the teacher may rule tokens out without NaNs.
    assert float(kd_loss(t, t, T).abs().max()) < 1e-5
    t_inf = t.clone()
    t_inf[..., :3] = float("-inf")
    assert torch.isfinite(kd_loss(s, t_inf, T)).all()


def test_kd_loss_gradient_is_T_times_q_minus_p():
    """d/dz_s of T^2 KL(p || q) = T (q - p): the T^2 factor keeps the gradient scale independent of T."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 9, generator=g).requires_grad_()
    t = torch.randn(3, 9, generator=g)
    for T in (1.0, 4.0):
        s.grad = None
        kd_loss(s, t, T).sum().backward()
        want = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1))
        torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-6)


def test_kd_loss_rejects_bad_arguments():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(x, x, alpha=0.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(x, x, temperature=0.0)
    with pytest.raises(ValueError, match="shapes"):
        kd_loss(x, torch.zeros(1, 4))


# ------------------------------------------------------------------------------------------ student
def test_student_copies_the_chosen_teacher_blocks():
    teacher = tiny_model(seed=3, n_layers=4).eval()
    student = student_from_teacher(teacher, [0, 3])
    assert student.cfg.n_layers == 2 and student.cfg.vocab_size == teacher.cfg.vocab_size
    torch.testing.assert_close(student.layers[1].mlp.up_proj.weight, teacher.layers[3].mlp.up_proj.weight)
    torch.testing.assert_close(student.embed_tokens.weight, teacher.embed_tokens.weight)
    assert student.layers[1].mlp.up_proj.weight.data_ptr() != teacher.layers[3].mlp.up_proj.weight.data_ptr()
    # Copying every block gives the teacher back.
    ids = torch.randint(0, teacher.cfg.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(student_from_teacher(teacher, [0, 1, 2, 3])(ids), teacher(ids))
    with pytest.raises(ConfigError, match="layer 4 does not exist"):
        student_from_teacher(teacher, [0, 4])


def test_config_preset_and_overrides():
    cfg = load_distill_config("smollm2-draft", overrides=["max_steps=7", "student_layers=0,5", "alpha=0.1"])
    assert cfg.train.max_steps == 7 and cfg.student_layers == [0, 5] and cfg.alpha == 0.1
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_distill_config("smollm2-draft", overrides=["bogus=1"])
    with pytest.raises(ConfigError, match="kd_on"):
        load_distill_config("smollm2-draft", overrides=["kd_on=prompt"])


# ---------------------------------------------------------------------------------------- end to end
def test_distill_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: llmlab distill")


def test_distill_run_lowers_kl_and_the_student_drafts_exactly(tmp_path, capsys):
    """A few KD steps from a tiny random teacher lower the held-out KL; with the student as draft, greedy
    speculative decoding gives exactly the teacher's own greedy output, at a well-defined acceptance rate."""
    import llmlab

    # A peaked teacher (larger init) so its argmaxes are clear and one copied block is far from it.
    teacher_dir = save_checkpoint(
        tmp_path / "teacher", tiny_model(seed=0, n_layers=3, init_std=0.1), chat_tokenizer()
    )
    out = tmp_path / "draft"
    code = main(
        [
            "distill",
            "--teacher",
            str(teacher_dir),
            "--out",
            str(out),
            "student_layers=0",
            "max_examples=64",
            "max_len=96",
            "heldout=8",
            "eval_examples=8",
            "teacher_responses=4",
            "response_tokens=8",
            "accept_prompts=3",
            "accept_tokens=12",
            "train.seq_len=96",
            "train.batch_size=8",
            "train.max_steps=12",
            "train.warmup_steps=2",
            "train.lr=3e-3",
            "train.eval_every=0",
            "train.save_every=0",
            "train.peak_tflops=1",
            "train.progress=false",
            "train.plot=false",
            "train.precision=fp32",
        ]
    )
    assert code == 0
    report = json.loads((out / "distill_report.json").read_text())
    assert report["after"]["kl"] < 0.8 * report["before"]["kl"], report
    assert report["data"]["teacher_responses"] == 4 and (out / "teacher_responses.jsonl").is_file()
    spec = report["speculative"]
    assert spec["identical"] is True
    assert 0.0 <= spec["acceptance"] <= 1.0 and spec["tokens_per_step"] >= 1.0
    assert "acceptance" in capsys.readouterr().out
    student, tok = llmlab.load(out / "final")
    assert student.cfg.n_layers == 1 and tok.vocab_size == chat_tokenizer().vocab_size
