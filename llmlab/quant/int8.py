"""int8 weight-only quantization, symmetric, one scale per output channel.

``W[n, :] ~ q[n, :] * scale[n]`` with ``q`` in [-127, 127]. For decode with bf16 activations the forward
runs PyTorch's CPU int8 GEMM (``torch._weight_int8pack_mm``: int8 weights, per-channel scales applied in
the kernel), which reads a quarter of the fp32 weight bytes; that is what makes batch-1 decode faster, not
only smaller. Other inputs dequantize and use the float GEMM (see :class:`QuantLinear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.quant.common import AffineQuantizer, QuantLinear


def int8_quantizer(in_features: int) -> AffineQuantizer:
    """Per-channel symmetric int8: one group spanning all input columns, zero point 0."""
    return AffineQuantizer(qmin=-127, qmax=127, symmetric=True, group_size=in_features)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, K]`` float -> (int8 codes ``[N, K]``, fp32 scales ``[N]``)."""
    codes, scales, _ = int8_quantizer(weight.shape[1]).quantize_matrix(weight.detach())
    return codes.to(torch.int8), scales[:, 0].contiguous()


def dequantize_int8(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (codes.float() * scales.float()[:, None]).to(dtype)


class Int8Linear(QuantLinear):
    """Frozen linear with int8 per-channel weights. Buffers: ``qweight`` (int8), ``scales`` (fp32), ``bias``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, bias_dtype=torch.float32):
        super().__init__(in_features, out_features, bias, bias_dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, bias: Tensor | None = None) -> Int8Linear:
        module = cls(codes.shape[1], codes.shape[0], bias is not None)
        module.qweight.copy_(codes.to(torch.int8))
        module.scales.copy_(scales.reshape(-1).float())
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        return module

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        return cls.from_codes(*quantize_int8(weight), bias=bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.kernel_ok(x):
            return super().forward(x)
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight, self.scales.to(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def linear_reference(module: QuantLinear, x: Tensor) -> Tensor:
    """Dequantize-then-matmul output of any quantized linear (the check for fused kernels)."""
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return F.linear(x, module.dequantize(x.dtype), bias)
