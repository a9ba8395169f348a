"""NF4: 4-bit NormalFloat weights with double-quantized block scales (QLoRA, Dettmers et al. 2023).

Layout (the same as bitsandbytes, so the codes match theirs bit for bit):

- The weight is flattened row-major and cut into blocks of ``block_size`` (64) values. Each block is divided
  by its absolute maximum and every value is rounded to the nearest of the 16 NF4 levels (quantiles of a
  standard normal, rescaled to [-1, 1], with an exact 0). Two 4-bit codes are packed per byte, the first
  value in the high nibble.
- Double quantization: the fp32 block maxima (``absmax``) minus their mean (``offset``) are quantized again,
  in blocks of 256, to 8-bit codes of bitsandbytes' signed "dynamic" map with one fp32 scale per block.
  That costs 8 + 32/256 bits per 64 weights (0.127 bits/weight) instead of 32/64 = 0.5.

``quantize_nf4`` / ``dequantize_nf4`` are the tensor API; :class:`NF4Linear` is the frozen module QLoRA wraps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmlab.errors import ConfigError
from llmlab.quant.common import QuantLinear

# The 16 NF4 levels (bitsandbytes' table; QLoRA appendix E).
NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip
DQ_BLOCK = 256  # blocks of absmax values sharing one second-level scale


@functools.cache
def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (``create_dynamic_map(signed=True)``), sorted, 256 values.

    A dynamic exponent (powers of ten) and a shrinking linear fraction: fine resolution near 0 and still
    covering [-1, 1]; it is what the QLoRA paper calls 8-bit floats for the second-level quantization.
    """
    max_exp, non_sign = 7, 7
    data: list[float] = []
    for i in range(max_exp):
        items = 2 ** (i + non_sign - max_exp) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (-(max_exp - 1) + i) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _nearest_code(x: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest level (levels sorted); ties go up, as bitsandbytes' bucketize does."""
    midpoints = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(x, midpoints, out_int32=True).to(torch.uint8)


def _blockwise_absmax(flat: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Split ``flat`` into blocks (last one may be short) -> (values scaled to [-1, 1], absmax per block)."""
    n = flat.numel()
    full = n - n % block
    absmax = flat[:full].view(-1, block).abs().amax(dim=1)
    # Multiply by the reciprocal (not divide), as bitsandbytes does, so rounding ties land the same way.
    scaled = (flat[:full].view(-1, block) * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, flat[full:] / tail_max])
    return scaled.clamp(-1, 1), absmax


def _expand_blocks(scales: Tensor, n: int, block: int) -> Tensor:
    return scales.repeat_interleave(block)[:n]


@dataclass
class NF4Tensor:
    """A quantized NF4 tensor: packed codes + (optionally double-quantized) block maxima."""

    codes: Tensor  # uint8 [ceil(numel / 2)], two 4-bit codes per byte
    absmax: Tensor  # fp32 [blocks], or uint8 dynamic-map codes [blocks] when double-quantized
    absmax_scale: Tensor | None  # fp32 [ceil(blocks / 256)] second-level scales (double quantization)
    absmax_offset: Tensor | None  # fp32 scalar mean of absmax (double quantization)
    shape: tuple[int, ...]
    block_size: int = 64

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def block_absmax(self) -> Tensor:
        """The fp32 per-block maxima (decoding the second level when double-quantized)."""
        if not self.double_quant:
            return self.absmax.float()
        values = dynamic_map()[self.absmax.long()]
        return values * _expand_blocks(self.absmax_scale, values.numel(), DQ_BLOCK) + self.absmax_offset

    def nbytes(self) -> int:
        parts = [self.codes, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_nf4(self, dtype)


def quantize_nf4(weight: Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize any float tensor to NF4 (see the module docstring for the layout)."""
    if block_size <= 0:
        raise ConfigError(f"NF4 block size must be positive, got {block_size}")
    flat = weight.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise ConfigError("cannot NF4-quantize an empty tensor")
    scaled, absmax = _blockwise_absmax(flat, block_size)
    q = _nearest_code(scaled, NF4_LEVELS.to(flat.device))
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    packed = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return NF4Tensor(packed, absmax, None, None, tuple(weight.shape), block_size)
    offset = absmax.mean()
    scaled2, scale2 = _blockwise_absmax(absmax - offset, DQ_BLOCK)
    q2 = _nearest_code(scaled2, dynamic_map().to(flat.device))
    return NF4Tensor(packed, q2, scale2, offset, tuple(weight.shape), block_size)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """NF4 codes -> float tensor of the original shape."""
    n = 1
    for d in q.shape:
        n *= d
    codes = torch.stack([q.codes >> 4, q.codes & 0x0F], dim=1).reshape(-1)[:n]
    values = NF4_LEVELS.to(q.codes.device)[codes.long()]
    values = values * _expand_blocks(q.block_absmax(), n, q.block_size)
    return values.reshape(q.shape).to(dtype)


class NF4Linear(QuantLinear):
    """A frozen linear whose weight is NF4; it dequantizes to the activation dtype in every forward.

    Buffers (what ``state_dict``/safetensors hold): ``weight_codes`` (uint8 packed), ``weight_absmax``
    (uint8 codes, or fp32 without double quantization), ``weight_absmax_scale`` and ``weight_absmax_offset``
    (fp32; only with double quantization), and ``bias`` if any.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        block_size: int = 64,
        double_quant: bool = True,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(in_features, out_features, bias, bias_dtype)
        n = in_features * out_features
        blocks = -(-n // block_size)
        self.block_size = block_size
        self.double_quant = double_quant
        self.register_buffer("weight_codes", torch.zeros((n + 1) // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("weight_absmax", torch.zeros(blocks, dtype=torch.uint8))
            self.register_buffer("weight_absmax_scale", torch.zeros(-(-blocks // DQ_BLOCK)))
            self.register_buffer("weight_absmax_offset", torch.zeros(()))
        else:
            self.register_buffer("weight_absmax", torch.zeros(blocks))
            self.weight_absmax_scale = None
            self.weight_absmax_offset = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> NF4Linear:
        """Quantize an ``nn.Linear`` (its bias is kept in its own dtype, on its device)."""
        return cls.from_weight(linear.weight, linear.bias, block_size, double_quant).to(linear.weight.device)

    @classmethod
    def from_weight(
        cls, weight: Tensor, bias: Tensor | None = None, block_size: int = 64, double_quant: bool = True
    ) -> NF4Linear:
        """Build from a float weight ``[out, in]`` (e.g. after AWQ scaling) and an optional bias."""
        out_features, in_features = weight.shape
        bias_dtype = bias.dtype if bias is not None else torch.float32
        module = cls(in_features, out_features, bias is not None, block_size, double_quant, bias_dtype)
        module.load_nf4(quantize_nf4(weight, block_size, double_quant))
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    def load_nf4(self, q: NF4Tensor) -> None:
        if q.shape != (self.out_features, self.in_features) or q.double_quant != self.double_quant:
            raise ConfigError(f"NF4 tensor of shape {q.shape} does not fit {self}")
        self.weight_codes = q.codes.clone()
        self.weight_absmax = q.absmax.clone()
        if q.double_quant:
            self.weight_absmax_scale = q.absmax_scale.clone()
            self.weight_absmax_offset = q.absmax_offset.clone().reshape(())

    def nf4(self) -> NF4Tensor:
        return NF4Tensor(
            self.weight_codes,
            self.weight_absmax,
            self.weight_absmax_scale,
            self.weight_absmax_offset,
            (self.out_features, self.in_features),
            self.block_size,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_nf4(self.nf4(), dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, double_quant={self.double_quant}"
