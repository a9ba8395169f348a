"""NF4 (QLoRA's 4-bit NormalFloat with double quantization) against bitsandbytes on the same tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llmlab.errors import ConfigError
from llmlab.quant.nf4 import NF4_LEVELS, NF4Linear, dequantize_nf4, dynamic_map, quantize_nf4

bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(128, 256), (300, 64), (576, 1536)]  # 512, 300 and 13,824 blocks: full and partial 256-block tails


def _weight(shape, seed=0):
    torch.manual_seed(seed)
    return torch.randn(shape) * 0.02


@pytest.mark.parametrize("shape", SHAPES)
def test_codes_match_bitsandbytes(shape):
    w = _weight(shape)
    q = quantize_nf4(w, block_size=64, double_quant=True)
    q_bnb, state = bnb_functional.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    # 4-bit codes and packing order are bit-identical.
    assert torch.equal(q.codes, q_bnb.reshape(-1))
    # Second level: same offset, same per-256 scales, same 8-bit code map.
    assert torch.equal(dynamic_map(), state.state2.code)
    assert torch.allclose(q.absmax_offset, state.offset)
    assert torch.equal(q.absmax_scale, state.state2.absmax)
    # bitsandbytes' CPU kernel picks a neighbouring 8-bit code for a few absmax values; ours is the nearest.
    assert (q.absmax == state.absmax).float().mean() > 0.99
    exact = (_absmax(w) - q.absmax_offset) / q.absmax_scale.repeat_interleave(256)[: q.absmax.numel()]
    levels = dynamic_map()
    ours = (levels[q.absmax.long()] - exact).abs()
    theirs = (levels[state.absmax.long()] - exact).abs()
    assert torch.all(ours <= theirs + 1e-7)


def _absmax(w, block=64):
    return w.reshape(-1, block).abs().amax(dim=1)


@pytest.mark.parametrize("shape", SHAPES)
def test_reconstruction_error_matches_bitsandbytes(shape):
    w = _weight(shape, seed=1)
    ours = dequantize_nf4(quantize_nf4(w))
    q_bnb, state = bnb_functional.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    theirs = bnb_functional.dequantize_4bit(q_bnb, state)
    err_ours = ((ours - w).norm() / w.norm()).item()
    err_theirs = ((theirs - w).norm() / w.norm()).item()
    assert err_ours == pytest.approx(err_theirs, rel=1e-3)
    assert 0.05 < err_ours < 0.11  # NF4 on Gaussian weights: ~9% relative error
    # Where the absmax codes differ by one step, the block's values differ by under 1% of the max.
    assert (ours - theirs).abs().max() < 1e-2 * w.abs().max()


def test_without_double_quant_equals_bitsandbytes_exactly():
    w = _weight((96, 128), seed=2)
    q = quantize_nf4(w, block_size=64, double_quant=False)
    q_bnb, state = bnb_functional.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
    assert torch.equal(q.codes, q_bnb.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(q), bnb_functional.dequantize_4bit(q_bnb, state))


def test_roundtrip_hits_levels_exactly_and_error_is_bounded():
    # Values that are exactly NF4 levels times a block max come back unchanged (no double quant).
    block = NF4_LEVELS.repeat(4) * 3.0
    assert torch.equal(dequantize_nf4(quantize_nf4(block, 64, double_quant=False)), block)
    # Every value is at most half the largest gap between levels (times its block max) away.
    w = _weight((64, 64), seed=3)
    q = quantize_nf4(w, 64, double_quant=False)
    max_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()
    bound = (max_gap / 2 * _absmax(w)).repeat_interleave(64).reshape(w.shape)
    assert torch.all((dequantize_nf4(q) - w).abs() <= bound + 1e-7)


def test_nf4_linear_forward_state_and_bytes(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    q = NF4Linear.from_linear(lin)
    x = torch.randn(3, 5, 256)
    ref = F.linear(x, q.dequantize(), lin.bias)
    assert torch.allclose(q(x), ref, atol=1e-6)
    assert q(x.bfloat16()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in q.parameters())
    # Saves to safetensors (uint8 codes, uint8 absmax codes, fp32 scales/offset) and loads back exactly.
    state = q.state_dict()
    assert state["weight_codes"].dtype == torch.uint8 and state["weight_absmax"].dtype == torch.uint8
    save_file(state, str(tmp_path / "nf4.safetensors"))
    fresh = NF4Linear(256, 96, bias=True)
    fresh.load_state_dict(load_file(str(tmp_path / "nf4.safetensors")))
    assert torch.equal(fresh(x), q(x))
    # 4 bits + 8/64 bits of absmax codes + 32/(64*256) bits of scales per weight.
    bits = q.weight_bytes() * 8 / (256 * 96)
    assert 4.12 < bits < 4.14
    plain = NF4Linear.from_linear(lin, double_quant=False)
    assert plain.weight_bytes() > q.weight_bytes()
    assert torch.allclose(plain(x), q(x), atol=5e-2)


def test_bad_block_size():
    with pytest.raises(ConfigError, match="block size"):
        quantize_nf4(torch.randn(8, 8), block_size=0)
