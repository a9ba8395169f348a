"""``llmlab sft`` end to end on a tiny model: full / LoRA / QLoRA runs, artifacts, report, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch
from test_sft import tiny_tokenizer

from llmlab.cli import main
from llmlab.model import ModelConfig, Transformer
from llmlab.model.checkpoint import load_checkpoint, save_checkpoint
from llmlab.model.lora import apply_adapter
from llmlab.recipes.sft import load_sft_config, run_sft
from llmlab.sft.datasets import SFTBatchSource
from llmlab.train.logging import read_metrics

FAST = [
    "max_steps=3",
    "batch_size=4",
    "seq_len=128",
    "max_len=96",
    "task_examples=60",
    "task_eval_per_task=1",
    "general_eval_tokens=512",
    "eval_batches=1",
    "warmup_steps=1",
    "log_every=1",
    "max_new_tokens=4",
    "train.progress=false",
    "train.precision=fp32",
    "peak_tflops=1.0",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=128)
    )
    path = tmp_path_factory.mktemp("base") / "ckpt"
    save_checkpoint(path, model, tok)
    return path


def test_config_aliases_and_bad_keys():
    cfg = load_sft_config("tiny-tasks-lora", None, ["max_steps=7", "lora_r=4", "lora_alpha=8", "lr=1e-4"])
    assert (cfg.train.max_steps, cfg.lora.r, cfg.lora.alpha, cfg.train.lr) == (7, 4, 8.0, 1e-4)
    from llmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown config key 'lora_rank'"):
        load_sft_config(None, None, ["lora_rank=4"])
    with pytest.raises(ConfigError, match="'peft' must be one of"):
        load_sft_config(None, None, ["peft=bitfit"])


@pytest.mark.parametrize("peft", ["none", "lora", "qlora"])
def test_sft_run_writes_artifacts_and_report(base_dir, tmp_path, peft):
    cfg = load_sft_config(
        None,
        None,
        [
            *FAST,
            f"base={base_dir}",
            "data=tasks",
            f"peft={peft}",
            "lora_r=4",
            "l2sp=0.01",
            "task_eval_before=false",
        ],
    )
    out = tmp_path / "run"
    report = run_sft(cfg, out)
    assert report["train"]["steps"] == 3
    for key in ("sft_val_loss", "general_loss"):
        assert report["after"][key] > 0 and report["before"][key] > 0
    assert 0.0 <= report["after"]["tasks"]["exact_match"] <= 1.0
    assert json.loads((out / "sft_report.json").read_text())["peft"] == peft
    base, _ = load_checkpoint(base_dir)
    ids = torch.randint(0, base.cfg.vocab_size, (1, 10))
    if peft == "none":
        tuned, tok = load_checkpoint(out / "final")
        assert tok.chat_template and "<|im_end|>" in tok.extra_stop_tokens
        assert not torch.allclose(tuned(ids), base(ids))
    else:
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        assert (out / "metrics.jsonl").is_file() and list(out.glob("ckpt-*"))  # logs and checkpoints kept
        ckpt = next(out.glob("ckpt-*"))  # the frozen (NF4 for qlora) base is not saved again
        assert (ckpt / "trainable.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
        assert report["params"]["trainable"] < report["params"]["params"] / 2
        if peft == "qlora":
            q = report["qlora_memory"]
            assert 3.5 < q["bf16_bytes"] / q["nf4_bytes"] < 4.0
            assert report["before"]["general_loss_nf4"] != report["before"]["general_loss"]
        else:
            tuned = apply_adapter(base, out)
            assert not torch.allclose(tuned(ids), load_checkpoint(base_dir)[0](ids))


class Kill(Exception):
    pass


def test_lora_checkpoints_hold_only_the_adapter_and_resume_exactly(base_dir, tmp_path, monkeypatch, capsys):
    """A LoRA run's ckpt-*/ holds the LoRA tensors only (not the frozen base), and a run killed after its
    checkpoint and resumed with ``resume=True`` ends exactly where the uninterrupted run does."""
    from safetensors import safe_open

    from llmlab.errors import CheckpointError
    from llmlab.model.lora import LoRAConfig, apply_lora
    from llmlab.train import Trainer

    # LoRA dropout makes the restored RNG matter; accumulation makes the restored data position matter.
    args = [*FAST, f"base={base_dir}", "data=tasks", "peft=lora", "lora_r=4", "lora_dropout=0.1"]
    args += ["max_steps=4", "save_every=2", "grad_accum_steps=2", "task_eval_per_task=0", "eval_every=0"]
    cfg = load_sft_config(None, None, args)
    run_sft(cfg, tmp_path / "full")

    real_next = SFTBatchSource.next_batch

    def dies_after_step_2(self):  # like a killed process: 2 optimizer steps x 2 micro-batches
        if self.step >= 4:
            raise Kill
        return real_next(self)

    split = tmp_path / "split"
    monkeypatch.setattr(SFTBatchSource, "next_batch", dies_after_step_2)
    with pytest.raises(Kill):
        run_sft(load_sft_config(None, None, args), split)
    monkeypatch.setattr(SFTBatchSource, "next_batch", real_next)

    ckpt = split / "ckpt-0000002"
    assert not (ckpt / "model.safetensors").exists()
    with safe_open(str(ckpt / "trainable.safetensors"), "pt") as f:
        saved = set(f.keys())
    model, _ = load_checkpoint(base_dir)
    apply_lora(model, LoRAConfig(r=4, dropout=0.1))
    assert saved == {n for n, p in model.named_parameters() if p.requires_grad}
    assert saved and all(".lora_A." in n or ".lora_B." in n for n in saved)
    base_bytes = (base_dir / "model.safetensors").stat().st_size
    assert (ckpt / "trainable.safetensors").stat().st_size < base_bytes / 10
    with pytest.raises(CheckpointError, match="only the trainable tensors"):
        load_checkpoint(ckpt)  # not a whole model: a clear error, not a half-loaded one

    capsys.readouterr()
    run_sft(load_sft_config(None, None, args), split, resume=True)
    assert f"resumed from {ckpt} at step 2" in capsys.readouterr().out  # not a silent rerun from scratch

    def losses(out):
        return {
            r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "train"
        }

    a, b = losses(tmp_path / "full"), losses(split)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    fa = load_checkpoint(base_dir)[0]
    fb = load_checkpoint(base_dir)[0]
    apply_adapter(fa, tmp_path / "full")
    apply_adapter(fb, split)
    for (k, va), vb in zip(fa.state_dict().items(), fb.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=k)

    # A model whose trainable tensors differ from the checkpoint's: an error naming the tensor.
    other, _ = load_checkpoint(base_dir)
    apply_lora(other, LoRAConfig(r=8))
    trainer = Trainer(other, cfg.train, None, out_dir=tmp_path / "other")
    with pytest.raises(
        CheckpointError, match=r"tensor 'layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape"
    ):
        trainer.load(ckpt)


def test_replay_and_freeze_and_early_stop(base_dir, tmp_path):
    cfg = load_sft_config(
        None,
        None,
        [
            *FAST,
            f"base={base_dir}",
            "data=tasks",
            "freeze_layers=1",
            "replay_fraction=0.5",
            "replay_corpus=tinyshakespeare",
            "early_stop_patience=1",
            "early_stop_rise=-1",
            "eval_every=1",
            "max_steps=5",
            "task_eval_per_task=0",
        ],
    )
    report = run_sft(cfg, tmp_path / "run")
    # early_stop_rise=-1 makes every evaluation "worse than the base": the run stops after the first eval.
    assert report["train"]["early_stopped_at"] == 1 and report["train"]["steps"] < 5
    tuned, _ = load_checkpoint(tmp_path / "run" / "final")
    base, _ = load_checkpoint(base_dir)
    assert torch.equal(tuned.layers[0].mlp.up_proj.weight, base.layers[0].mlp.up_proj.weight)
    assert torch.equal(tuned.embed_tokens.weight, base.embed_tokens.weight)
    assert not torch.equal(tuned.layers[1].mlp.up_proj.weight, base.layers[1].mlp.up_proj.weight)


def test_cli_bad_input_exits_2_with_one_line(base_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "user", "content": "only a question"}]}\n'
    )
    code = main(["sft", "--base", str(base_dir), "--data", str(bad), "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"{bad}:2: conversation has no assistant turn" in err
    code = main(
        ["sft", "--base", str(base_dir), "--data", "tasks", "--out", str(tmp_path / "o"), "lora_rank=3"]
    )
    assert code == 2 and "unknown config key 'lora_rank'" in capsys.readouterr().err


def test_forgetting_is_measured_on_the_bases_own_corpus(tmp_path):
    """``auto`` picks the corpus ``llmlab pretrain`` recorded in the base's config.json."""
    import json

    from llmlab.sft.forgetting import resolve_corpus

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps({"llmlab_format": 1, "pretrain": {"data": {"corpus": "tinystories"}}})
    )
    assert resolve_corpus("auto", str(base)) == "tinystories"
    assert resolve_corpus("wikitext2-test", str(base)) == "wikitext2-test"
    assert resolve_corpus("auto", str(tmp_path / "missing")) == "tinyshakespeare"
    assert resolve_corpus("auto", "smollm2") == "tinyshakespeare"


def test_dropout_override_reaches_every_site():
    """``dropout=0`` makes a base built with dropout deterministic in train mode; raising from 0 is refused."""
    from llmlab.errors import ConfigError
    from llmlab.recipes.common import set_dropout

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, dropout=0.5)
    )
    ids = torch.randint(0, 64, (2, 16))
    model.train()
    assert not torch.equal(model(ids), model(ids))  # dropout is live
    set_dropout(model, 0.0)
    assert torch.equal(model(ids), model(ids)) and model.cfg.dropout == 0.0
    model.eval()
    reference = model(ids)
    model.train()
    torch.testing.assert_close(model(ids), reference)
    with pytest.raises(ConfigError, match="without dropout"):
        set_dropout(model, 0.1)


def test_replay_kd_distills_replay_rows_to_the_base(base_dir, tmp_path):
    """``replay_loss=kd``: SFT rows keep their next-token loss; replay rows add KL(base || model), which is
    exactly 0 while the model is the base, and the run trains end to end (full and LoRA)."""
    from llmlab.data import tasks
    from llmlab.sft.datasets import Conversation, encode_conversations
    from llmlab.sft.forgetting import replay_kd_loss
    from llmlab.train import causal_lm_loss

    base, tok = load_checkpoint(base_dir)
    convs = [Conversation(r["messages"], f"t:{i}") for i, r in enumerate(tasks.make_sft_examples(40))]
    examples = encode_conversations(tok, convs, max_len=96)
    replay = (torch.arange(500) % 60).numpy()
    src = SFTBatchSource(examples, 4, 96, tok.pad_id, replay=replay, replay_fraction=0.5)
    batch = next(b for b in (src.batch_at(k) for k in range(20)) if 0 < int(b["replay_rows"].sum()) < 4)
    rows = batch["replay_rows"]
    out = replay_kd_loss(base)(base, batch)
    sft_only = {**batch, "labels": batch["labels"].masked_fill(rows[:, None], -100)}
    want = causal_lm_loss(base, sft_only)
    torch.testing.assert_close(out.loss_sum, want.loss_sum, rtol=1e-5, atol=1e-4)  # KD term is 0
    assert out.weight == want.weight + float(rows.sum()) * batch["input_ids"].shape[1]
    other = Transformer(base.cfg)  # a different model: the KD term is positive
    assert replay_kd_loss(base)(other, batch).metrics["replay_kd"] > 0.01

    for peft in ("none", "lora"):
        cfg = load_sft_config(
            None,
            None,
            [
                *FAST,
                f"base={base_dir}",
                "data=tasks",
                "replay_fraction=0.5",
                "replay_loss=kd",
                "replay_corpus=tinyshakespeare",
                "max_steps=3",
                "task_eval_per_task=0",
                f"peft={peft}",
            ],
        )
        report = run_sft(cfg, tmp_path / peft)
        assert report["train"]["steps"] == 3
