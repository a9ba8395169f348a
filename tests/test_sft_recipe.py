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
from llmlab.sft.recipe import load_sft_config, run_sft

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
        load_sft_config(None, None, ["peft=dora"])


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
        assert report["params"]["trainable"] < report["params"]["params"] / 2
        if peft == "qlora":
            q = report["qlora_memory"]
            assert 3.5 < q["bf16_bytes"] / q["nf4_bytes"] < 4.0
            assert report["before"]["general_loss_nf4"] != report["before"]["general_loss"]
        else:
            tuned = apply_adapter(base, out)
            assert not torch.allclose(tuned(ids), load_checkpoint(base_dir)[0](ids))


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

    from llmlab.sft.recipe import resolve_corpus

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps({"llmlab_format": 1, "pretrain": {"data": {"corpus": "tinystories"}}})
    )
    assert resolve_corpus("auto", str(base)) == "tinystories"
    assert resolve_corpus("wikitext2-test", str(base)) == "wikitext2-test"
    assert resolve_corpus("auto", str(tmp_path / "missing")) == "tinyshakespeare"
    assert resolve_corpus("auto", "smollm2") == "tinyshakespeare"
