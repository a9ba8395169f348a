"""Weight-only quantization: int8 / int4 round trips, CPU kernels vs the dequantized reference, GPTQ, AWQ,
whole-model quantization, the quantized checkpoint format, bad input and the ``llmlab quantize`` CLI."""

from __future__ import annotations

import copy
import json
from functools import lru_cache

import pytest
import torch

from llmlab.errors import CheckpointError, ConfigError
from llmlab.model import ModelConfig, Transformer
from llmlab.model.checkpoint import save_checkpoint
from llmlab.quant.awq import fold_scale, search_scale
from llmlab.quant.gptq import HessianAccumulator, gptq_quantize
from llmlab.quant.int4 import Int4Linear, dequantize_int4, int4_quantizer, quantize_int4
from llmlab.quant.int8 import Int8Linear, dequantize_int8, int8_quantizer, linear_reference, quantize_int8
from llmlab.quant.quantize import (
    QuantConfig,
    fake_quantize,
    linear_bytes,
    load_quantized,
    model_bytes,
    quantize_model,
    save_quantized,
)


@lru_cache(maxsize=1)
def _tokenizer():
    from llmlab.data.corpora import read_text
    from llmlab.tokenizer.train import train_tokenizer

    text = read_text("wikitext2-valid")[:60_000]
    return train_tokenizer([text[i : i + 2000] for i in range(0, len(text), 2000)], vocab_size=400)


def _model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    base = dict(vocab_size=400, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, d_ff=128)
    base.update(kw)
    return Transformer(ModelConfig(**base)).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ----------------------------------------------------------------------------------- round trips
def test_int8_roundtrip_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.rand(48, 1)  # rows of very different scales
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and scales.shape == (48,)
    assert int(codes.abs().max()) == 127  # each row's largest value uses the full range
    err = (dequantize_int8(codes, scales) - w).abs()
    assert torch.all(err <= scales[:, None] / 2 + 1e-7)
    assert _rel(dequantize_int8(codes, scales), w) < 0.01


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_roundtrip_error_is_half_a_step(group_size, symmetric):
    torch.manual_seed(group_size)
    w = torch.randn(32, 256) * 0.05 + 0.01
    codes, scales, zeros = quantize_int4(w, group_size, symmetric)
    assert scales.shape == (32, 256 // group_size) and scales.dtype == torch.float16
    assert int(codes.max()) <= 15 and int(codes.min()) >= 0
    if symmetric:
        assert torch.all(zeros == 8)
    step = scales.float().repeat_interleave(group_size, dim=1)
    err = (dequantize_int4(codes, scales, zeros) - w).abs()
    # fp16 scales are used for the rounding itself, so the half-step bound holds for the stored values.
    assert torch.all(err <= step / 2 + 1e-6)
    assert _rel(dequantize_int4(codes, scales, zeros), w) < (0.12 if symmetric else 0.1)


def test_float_zero_reproduces_a_q4_1_grid_exactly():
    """llama.cpp's Q4_1 stores w = q * d + m per 32 weights (fp16 d, m): float-zero int4 with group 32
    re-quantizes such weights losslessly, where an integer zero point re-rounds them."""
    torch.manual_seed(0)
    d = (torch.rand(64, 8, 1) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(64, 8, 1) * 0.05).half().float()
    q = torch.randint(0, 16, (64, 8, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # every block uses its full range, as Q4_1's min/max fit does
    w = (q * d + m).reshape(64, 256)
    exact = Int4Linear.from_weight(w, group_size=32, float_zero=True)
    assert torch.equal(exact.dequantize(), w)
    assert exact.offsets.dtype == torch.float16 and not hasattr(exact, "zeros")
    assert _rel(Int4Linear.from_weight(w, group_size=32).dequantize(), w) > 0.01
    x = torch.randn(3, 256).bfloat16()  # the CPU kernel takes the float offset natively
    assert exact.kernel_ok(x) and _rel(exact(x).float(), linear_reference(exact, x.float())) < 1e-2


def test_smaller_groups_are_more_accurate():
    torch.manual_seed(0)
    w = torch.randn(64, 512) * torch.linspace(0.1, 3, 512)  # columns of growing scale
    errs = [_rel(dequantize_int4(*quantize_int4(w, g)), w) for g in (32, 64, 128, 256)]
    assert errs == sorted(errs)


# -------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("cls", ["int8", "int4"])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_forward_equals_dequantized_reference(cls, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 96, bias=bias)
    q = Int8Linear.from_linear(lin) if cls == "int8" else Int4Linear.from_linear(lin, group_size=64)
    x = torch.randn(2, 3, 192)
    exact = linear_reference(q, x)  # fp32 dequantize-then-matmul
    # fp32 activations take the exact path; bf16 decode-sized inputs run the int8/int4 kernel.
    assert not q.kernel_ok(x) and torch.allclose(q(x), exact)
    xb = x.bfloat16()
    assert q.kernel_ok(xb)
    out = q(xb)
    assert out.shape == (2, 3, 96) and out.dtype == torch.bfloat16
    assert _rel(out.float(), exact) < 1e-2  # bf16 rounding of activations and outputs only
    assert _rel(out.float(), linear_reference(q, xb).float()) < 1e-2
    q.use_kernel = False  # the switch really selects the other path
    assert not q.kernel_ok(xb)
    # Prefill-sized inputs dequantize (faster than the kernel there) and agree with the kernel's rows.
    q.use_kernel = True
    big = torch.randn(1, q.kernel_max_rows + 1, 192).bfloat16()
    assert not q.kernel_ok(big)
    assert _rel(q(big)[0, :4].float(), q(big[:, :4])[0].float()) < 1e-2
    # The quantized layer stays close to the float layer it replaced.
    assert _rel(q(x), lin(x)) < (0.01 if cls == "int8" else 0.12)


def test_int4_kernel_falls_back_for_unsupported_shapes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 40)  # 40 output features: not a multiple of the kernel's 16-wide tiles
    q = Int4Linear.from_linear(lin, group_size=32)
    x = torch.randn(3, 64).bfloat16()
    assert not q.kernel_ok(x)
    assert torch.allclose(q(x).float(), linear_reference(q, x).float())


def test_model_to_bf16_keeps_quantized_buffers():
    model = _model()
    quantize_model(model, QuantConfig(scheme="int4", group_size=32), progress=False)
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        ref = model(ids)
    model.to(torch.bfloat16)
    q = model.layers[0].self_attn.q_proj
    assert q.scales.dtype == torch.float16 and q.qweight.dtype == torch.uint8
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(ids)
    assert out.dtype == torch.bfloat16 and _rel(out.float(), ref) < 0.05


# ------------------------------------------------------------------------------------------- GPTQ
def _correlated_inputs(n: int, k: int, rank: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, rank, generator=g)
    return torch.randn(n, rank, generator=g) @ mix.T + 0.1 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("scheme", ["int4", "int4-sym", "int4-float-zero", "int8"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(scheme, act_order):
    torch.manual_seed(1)
    N, K = 64, 256
    w = torch.randn(N, K) * 0.05
    x = _correlated_inputs(2048, K)
    acc = HessianAccumulator(K)
    acc.add(x[:1024])
    acc.add(x[1024:])  # accumulating in pieces is the same as at once
    if scheme == "int8":
        quantizer = int8_quantizer(K)
    else:
        quantizer = int4_quantizer(64, symmetric=scheme == "int4-sym", float_zero=scheme == "int4-float-zero")
    rtn = quantizer.dequantize_matrix(*quantizer.quantize_matrix(w))
    codes, scales, zeros = gptq_quantize(w, acc.hessian(), quantizer, act_order=act_order)
    assert codes.min() >= quantizer.qmin and codes.max() <= quantizer.qmax
    gptq = quantizer.dequantize_matrix(codes, scales, zeros)
    ref = x @ w.T
    err_rtn, err_gptq = _rel(x @ rtn.T, ref), _rel(x @ gptq.T, ref)
    assert err_gptq < 0.5 * err_rtn, (err_gptq, err_rtn)
    if quantizer.scale_dtype is not None:  # the stored fp16 scales are what GPTQ compensated for
        assert torch.equal(scales, scales.half().float())


def test_gptq_handles_dead_inputs():
    torch.manual_seed(0)
    x = _correlated_inputs(512, 64)
    x[:, 5] = 0.0  # an input channel that is never active
    acc = HessianAccumulator(64)
    acc.add(x)
    codes, scales, zeros = gptq_quantize(torch.randn(32, 64), acc.hessian(), int4_quantizer(32))
    assert torch.isfinite(scales).all()
    assert torch.all(int4_quantizer(32).dequantize_matrix(codes, scales, zeros)[:, 5] == 0)


# -------------------------------------------------------------------------------------------- AWQ
def test_awq_scaling_reduces_error_with_outlier_channels():
    torch.manual_seed(0)
    K, N = 256, 96
    x = torch.randn(512, K)
    x[:, :4] *= 40.0  # a few outlier activation channels, as in real LLMs
    weights = [torch.randn(N, K) * 0.05, torch.randn(N // 2, K) * 0.05]
    cfg = QuantConfig(scheme="int4", group_size=64)
    cfg.validate()
    scale, err, base = search_scale(x, weights, lambda w: fake_quantize(w, cfg), grid=10)
    assert err < 0.7 * base
    assert scale[:4].min() > scale[4:].max()  # the outlier channels are scaled up


def test_awq_without_outliers_never_worse_than_rtn():
    torch.manual_seed(0)
    x = torch.randn(512, 128)
    cfg = QuantConfig(scheme="int4", group_size=32)
    cfg.validate()
    _, err, base = search_scale(x, [torch.randn(64, 128)], lambda w: fake_quantize(w, cfg), grid=8)
    assert err <= base


def test_fold_scale_keeps_the_float_function():
    model = _model()
    block = model.layers[0]
    x = torch.randn(2, 9, 64)
    rope = model.rotary(torch.arange(9)[None].expand(2, 9))
    meta = model.attn_meta(2, 9, x.device)
    before = block(x, rope, meta, None)
    s = torch.rand(64) + 0.5
    fold_scale(
        block.input_layernorm, [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj], s
    )
    s2 = torch.rand(128) + 0.5
    fold_scale(block.mlp.up_proj, [block.mlp.down_proj], s2)
    assert torch.allclose(block(x, rope, meta, None), before, atol=1e-5)


# ------------------------------------------------------------------------------ whole model + I/O
CONFIGS = {
    "int8": QuantConfig(scheme="int8"),
    "int4-g32": QuantConfig(scheme="int4", group_size=32),
    "int4-g64-sym": QuantConfig(scheme="int4", group_size=64, symmetric=True),
    "int4-g32-float-zero": QuantConfig(scheme="int4", group_size=32, float_zero=True),
    "nf4": QuantConfig(scheme="nf4", group_size=64),
    "int4-gptq-awq": QuantConfig(
        scheme="int4", group_size=32, gptq=True, awq=True, act_order=True, awq_grid=4
    ),
    "int8-gptq": QuantConfig(scheme="int8", gptq=True),
    "int4-gptq-float-zero": QuantConfig(scheme="int4", group_size=32, gptq=True, float_zero=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_save_load_gives_identical_logits(name, tmp_path):
    model = _model(seed=3)
    ids = torch.randint(0, 400, (2, 24))
    with torch.no_grad():
        ref = model(ids)
    cfg = copy.deepcopy(CONFIGS[name])
    calib = torch.randint(0, 400, (4, 32))
    report = quantize_model(model, cfg, calib_tokens=calib, progress=False)
    assert report["scheme"] == cfg.scheme
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert n_linear == 0  # every block linear replaced (the tied head is the embedding, not a Linear)
    with torch.no_grad():
        out = model(ids)
    assert _rel(out, ref) < (0.02 if cfg.scheme == "int8" else 0.2)
    save_quantized(tmp_path / "q", model, _tokenizer(), cfg)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["scheme"] == cfg.scheme
    assert config["quantization"]["group_size"] == cfg.group_size
    assert "layers.1.mlp.down_proj" in config["quantization"]["modules"]
    loaded, tok = load_quantized(tmp_path / "q")
    assert tok is not None and tok.vocab_size == _tokenizer().vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(ids), out)


def test_gptq_model_beats_rtn_on_calibration_like_text():
    """On a model whose inputs are correlated (trained-like), GPTQ's logits are closer to the float model's."""
    torch.manual_seed(0)
    model = _model(seed=5)
    ids = torch.randint(0, 400, (4, 32))
    with torch.no_grad():
        ref = model(ids)
    errs = {}
    for gptq in (False, True):
        q = copy.deepcopy(model)
        quantize_model(
            q, QuantConfig(scheme="int4", group_size=64, gptq=gptq), calib_tokens=ids, progress=False
        )
        with torch.no_grad():
            errs[gptq] = _rel(q(ids), ref)
    assert errs[True] < errs[False]


def test_include_head_quantizes_an_untied_head(tmp_path):
    model = _model(tie_embeddings=False)
    cfg = QuantConfig(scheme="int8", include_head=True)
    float_bytes = linear_bytes(model)
    quantize_model(model, cfg, progress=False)
    assert isinstance(model.lm_head, Int8Linear)
    assert linear_bytes(model) < 0.3 * float_bytes
    ids = torch.randint(0, 400, (1, 8))
    save_quantized(tmp_path / "q", model, None, cfg)
    loaded, tok = load_quantized(tmp_path / "q")
    assert tok is None
    assert torch.equal(loaded(ids), model(ids))


def test_memory_shrinks_by_the_expected_factor():
    model = _model(d_model=128, d_ff=384)
    before = linear_bytes(model)
    sizes = {}
    for scheme, g in (("int8", None), ("int4", 64), ("nf4", 64)):
        q = copy.deepcopy(model)
        quantize_model(q, QuantConfig(scheme=scheme, group_size=g), progress=False)
        sizes[scheme] = before / linear_bytes(q)
        assert model_bytes(q) < model_bytes(model)
    assert 3.85 < sizes["int8"] < 4.0  # int8 + one fp32 scale per row of 128 or 384 weights
    assert 7.0 < sizes["int4"] < 7.6  # 4 bits + fp16 scale and uint8 zero per 64 weights
    assert 7.6 < sizes["nf4"] < 7.8  # 4 bits + double-quantized block maxima


# ------------------------------------------------------------------------------------- bad input
def test_unknown_scheme_and_bad_group_size():
    with pytest.raises(ConfigError, match="unknown quantization scheme 'int3'"):
        quantize_model(_model(), QuantConfig(scheme="int3"), progress=False)
    with pytest.raises(ConfigError, match="group size must be"):
        quantize_model(_model(), QuantConfig(scheme="int4", group_size=48), progress=False)
    # 128 is a valid group size but does not divide d_model = 96.
    with pytest.raises(ConfigError, match=r"does not divide in_features=96 of 'layers.0.self_attn.q_proj'"):
        quantize_model(
            _model(d_model=96, n_heads=4), QuantConfig(scheme="int4", group_size=128), progress=False
        )
    with pytest.raises(ConfigError, match="GPTQ"):
        QuantConfig(scheme="nf4", gptq=True).validate()
    with pytest.raises(ConfigError, match="calibration"):
        quantize_model(_model(), QuantConfig(scheme="int4", group_size=32, gptq=True), progress=False)


def test_corrupt_quantized_checkpoints(tmp_path):
    model = _model()
    cfg = QuantConfig(scheme="int4", group_size=32)
    quantize_model(model, cfg, progress=False)
    save_quantized(tmp_path / "q", model, None, cfg)
    weights = tmp_path / "q" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_quantized(tmp_path / "q")
    weights.write_bytes(data)
    config_file = tmp_path / "q" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization"]["scheme"] = "int5"
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="int5"):
        load_quantized(tmp_path / "q")
    config["quantization"]["scheme"] = "int8"  # int8 layers have no zero points
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'layers\..*\.zeros'"):
        load_quantized(tmp_path / "q")
    config["quantization"].update(scheme="int4", group_size=64)  # the stored scales are for groups of 32
    config_file.write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"down_proj.scales' has shape \(64, 4\), the model expects \(64, 2\)"
    ):
        load_quantized(tmp_path / "q")
    with pytest.raises(CheckpointError, match="not found"):
        load_quantized(tmp_path / "missing")


# -------------------------------------------------------------------------------------------- CLI
def test_cli_quantize_then_eval(tmp_path, capsys):
    from llmlab.cli import main

    model = _model(seed=7)
    save_checkpoint(tmp_path / "src", model, _tokenizer())
    rc = main(["quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--scheme", "int4", "--group-size", "32",
               "--gptq", "--calib-samples", "4", "--calib-seq-len", "32"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "int4, group 32 + GPTQ" in out and "MiB" in out and "x smaller" in out
    loaded, _ = load_quantized(tmp_path / "dst")
    assert isinstance(loaded.layers[0].self_attn.q_proj, Int4Linear)
    import llmlab

    via_load, tok = llmlab.load(tmp_path / "dst")  # the public loader dispatches to load_quantized
    ids = torch.tensor([tok.encode("The game was released")])
    with torch.no_grad():
        assert torch.equal(via_load(ids), loaded(ids))
    text = tmp_path / "t.txt"
    text.write_text("The game was released in Japan in 2011 and received positive reviews. " * 20)
    assert main(["eval", "ppl", str(tmp_path / "dst"), "--data", str(text), "--seq-len", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ppl"] > 1 and result["bits_per_byte"] > 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    from llmlab.cli import main

    save_checkpoint(tmp_path / "src", _model(d_model=96, n_heads=4), _tokenizer())
    rc = main(
        ["quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--scheme", "int4", "--group-size", "128"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "does not divide in_features=96" in err
    assert not (tmp_path / "dst").exists()
    rc = main(["quantize", str(tmp_path / "src"), str(tmp_path / "dst2"), "--set", "bits=3"])
    assert rc == 2 and "unknown config key 'bits'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- int8 KV
def test_int8_kv_cache_decodes_like_the_float_cache():
    from llmlab.model import KVCache
    from llmlab.quant.kv_int8 import Int8KVCache

    model = _model(seed=11)
    prompt = torch.randint(0, 400, (2, 10))
    steps = torch.randint(0, 400, (2, 8))  # the same continuation for both caches (teacher forcing)
    outs = {}
    for name, cls in (("fp32", KVCache), ("int8", Int8KVCache)):
        cache = cls(model.cfg, batch_size=2, max_len=32)
        with torch.no_grad():
            logits = [model(prompt, cache=cache)[:, -1]]
            logits += [model(steps[:, i : i + 1], cache=cache)[:, -1] for i in range(steps.shape[1])]
        outs[name] = (torch.stack(logits), cache.nbytes())
    with torch.no_grad():
        full = model(torch.cat([prompt, steps], dim=1))[:, 9:].transpose(0, 1)
    assert torch.allclose(outs["fp32"][0], full, atol=1e-4)  # the float cache is exact
    assert 0 < _rel(outs["int8"][0], full) < 0.01
    # head_dim 16: (16 + 4) / (4 * 16) of the fp32 cache.
    assert outs["int8"][1] / outs["fp32"][1] == pytest.approx(20 / 64)
