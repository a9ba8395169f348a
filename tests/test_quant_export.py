"""Quantized checkpoints leaving llmlab (issue 17): ``convert --to hf`` writes dequantized float weights that
transformers loads (it used to write raw codes transformers silently replaced by random projections), and the
int4 group size fits the model (SmolLM2's d_model 576 is not a multiple of 128)."""

from __future__ import annotations

import json

import pytest
import torch
from _interop_helpers import tiny_tokenizer

from llmlab.cli import main
from llmlab.errors import ConfigError
from llmlab.interop.hf import save_hf
from llmlab.model import ModelConfig, Transformer
from llmlab.model.checkpoint import save_checkpoint
from llmlab.quant.common import dequantize_model, quantized_layers
from llmlab.quant.quantize import QUANT_PRESETS, QuantConfig, load_quantized, quantize_model, save_quantized


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, d_ff=128)
    base.update(kw)
    return Transformer(ModelConfig(**base)).eval()


@pytest.mark.parametrize(
    "cfg", [QuantConfig(scheme="int8"), QuantConfig(scheme="int4", group_size=32), QuantConfig(scheme="nf4")]
)
def test_convert_quantized_to_hf_dequantizes_and_transformers_loads_it(tmp_path, capsys, cfg):
    transformers = pytest.importorskip("transformers")
    model = _model(tie_embeddings=False)
    quantize_model(model, cfg, progress=False)
    save_quantized(tmp_path / "q", model, tiny_tokenizer(300), cfg)
    assert main(["convert", str(tmp_path / "q"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    err = capsys.readouterr().err
    assert f"is quantized ({type(model.layers[0].mlp.up_proj).__name__})" in err
    assert "writing its 14 quantized layers dequantized to float32" in err
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and not any("qweight" in k for k in keys)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_quantized(tmp_path / "q")
    dequantize_model(ours)
    assert not quantized_layers(ours)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(ref(ids).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=0)  # the quantized model's function


def test_save_hf_refuses_raw_quantized_layers(tmp_path):
    model = _model()
    quantize_model(model, QuantConfig(scheme="int8"), progress=False)
    with pytest.raises(ConfigError, match=r"quantized layers \('layers\.0\.self_attn\.q_proj\.qweight'\)"):
        save_hf(tmp_path / "hf", model)
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------ int4 group size
def test_int4_group_size_is_the_largest_that_fits_and_presets_agree():
    # d_model 192 (like SmolLM2's 576: a multiple of 64, not of 128); d_ff 384 is a multiple of 128.
    sizes = {}
    for name, cfg in {"flag": QuantConfig(scheme="int4"), "preset": QUANT_PRESETS["int4"]}.items():
        model = _model(d_model=192, n_heads=3, n_kv_heads=1, d_ff=384)
        report = quantize_model(model, QuantConfig(**cfg.to_dict()), progress=False)
        sizes[name] = report["group_size"]
        assert "int4 group size 64 (auto" in report["group_size_note"]
        assert "128 does not divide" in report["group_size_note"] and "192, 384" in report["group_size_note"]
        assert model.layers[1].mlp.down_proj.group_size == 64
    assert sizes == {"flag": 64, "preset": 64}
    report = quantize_model(_model(d_model=128, d_ff=256), QuantConfig(scheme="int4"), progress=False)
    assert report["group_size"] == 128 and "group_size_note" in report  # the cap: larger groups lose accuracy


def test_int4_group_size_errors_list_only_valid_divisors(tmp_path, capsys):
    model = _model(d_model=192, n_heads=3, n_kv_heads=1, d_ff=384)
    with pytest.raises(ConfigError, match=r"divide every layer of this model: 32, 64; or leave"):
        quantize_model(model, QuantConfig(scheme="int4", group_size=128), progress=False)
    with pytest.raises(ConfigError, match=r"no group size \(32, 64, 128, 256\) divides .* \(80, 160\): use"):
        quantize_model(_model(d_model=80, n_heads=5, n_kv_heads=1, d_ff=160), QuantConfig(scheme="int4"))
    save_checkpoint(
        tmp_path / "src", _model(d_model=192, n_heads=3, n_kv_heads=1, d_ff=384), tiny_tokenizer(300)
    )
    rc = main(
        ["quantize", str(tmp_path / "src"), str(tmp_path / "bad"), "--scheme", "int4", "--group-size", "128"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "32, 64;" in err and "128" not in err.split("(")[1]
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "q"), "--scheme", "int4"]) == 0
    out = capsys.readouterr().out
    assert "int4 group size 64 (auto" in out and "int4, group 64" in out
    meta = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert meta["group_size"] == 64
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "p"), "--preset", "int4"]) == 0
    assert json.loads((tmp_path / "p" / "config.json").read_text())["quantization"]["group_size"] == 64


@pytest.mark.slow
def test_smollm2_quantizes_to_int4_with_group_64(smollm2_gguf, tmp_path, capsys):
    """The reported failure: ``llmlab quantize SMOL.gguf q --scheme int4``."""
    assert main(["quantize", str(smollm2_gguf), str(tmp_path / "q"), "--scheme", "int4"]) == 0
    assert "int4 group size 64 (auto" in capsys.readouterr().out
    model, tok = load_quantized(tmp_path / "q")
    assert model.layers[0].self_attn.q_proj.group_size == 64
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()
