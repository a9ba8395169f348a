"""int4 weight-only quantization, group-wise (32/64/128 input columns per scale), asymmetric or symmetric.

Storage (portable, what the checkpoint holds): ``qweight`` uint8 ``[N, K/2]`` (two codes per byte, the
even column in the high nibble), ``scales`` fp16 ``[N, K/g]`` and ``zeros`` uint8 ``[N, K/g]`` (integer
zero points, 8 when symmetric); ``W ~ (q - zero) * scale``.

For decode with bf16 activations the forward uses PyTorch's CPU int4 GEMM
(``aten._weight_int4pack_mm_for_cpu``, the "tinygemm" layout; other inputs dequantize, see QuantLinear).
That kernel computes ``(q - 8) * scale + bias_g`` per group, so our integer zero point becomes the float
``bias_g = (8 - zero) * scale``. Its packed layout is CPU-specific, so it is built from the portable
codes on the first forward and kept outside the ``state_dict``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmlab.errors import ConfigError
from llmlab.quant.common import INT4_GROUP_SIZES, AffineQuantizer, QuantLinear, check_group_size

GROUP_SIZES = INT4_GROUP_SIZES


def int4_quantizer(group_size: int, symmetric: bool = False, float_zero: bool = False) -> AffineQuantizer:
    """Codes 0..15 with fp16 scales (codes are computed against the stored fp16 value)."""
    return AffineQuantizer(
        qmin=0,
        qmax=15,
        symmetric=symmetric,
        group_size=group_size,
        scale_dtype=torch.float16,
        float_zero=float_zero and not symmetric,
    )


def pack_int4(codes: Tensor) -> Tensor:
    """``[N, K]`` integer codes in [0, 15] -> uint8 ``[N, K/2]``, even column in the high nibble."""
    q = codes.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(packed: Tensor) -> Tensor:
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(packed.shape[0], -1)


def quantize_int4(
    weight: Tensor, group_size: int = 128, symmetric: bool = False, float_zero: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest ``[N, K]`` -> (codes ``[N, K]`` uint8, scales fp16 ``[N, K/g]``, zero points).

    Zero points are uint8 integers, or fp32 (``-min / scale``) with ``float_zero``.
    """
    check_group_size(weight.shape[1], group_size)
    quantizer = int4_quantizer(group_size, symmetric, float_zero)
    codes, scales, zeros = quantizer.quantize_matrix(weight.detach())
    return (
        codes.to(torch.uint8),
        scales.to(torch.float16),
        zeros if quantizer.float_zero else zeros.to(torch.uint8),
    )


def dequantize_int4(
    codes: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    g = codes.shape[1] // scales.shape[1]
    q = codes.float().reshape(codes.shape[0], -1, g)
    return ((q - zeros.float()[..., None]) * scales.float()[..., None]).reshape(codes.shape).to(dtype)


class Int4Linear(QuantLinear):
    """Frozen linear with group-wise int4 weights (see the module docstring for the layout)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 128,
        symmetric: bool = False,
        float_zero: bool = False,
        bias_dtype=torch.float32,
    ):
        super().__init__(in_features, out_features, bias, bias_dtype)
        check_group_size(in_features, group_size)
        if in_features % 2:
            raise ConfigError(f"int4 needs an even in_features, got {in_features}")
        self.group_size = group_size
        self.symmetric = symmetric
        self.float_zero = float_zero and not symmetric
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        if self.float_zero:
            # w = q * scale + offset (offset = the group minimum, fp16), as llama.cpp's Q4_1.
            self.register_buffer("offsets", torch.zeros(out_features, groups, dtype=torch.float16))
        else:
            self.register_buffer("zeros", torch.full((out_features, groups), 8, dtype=torch.uint8))
        self._kernel_cache: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_codes(
        cls,
        codes: Tensor,
        scales: Tensor,
        zeros: Tensor,
        bias: Tensor | None = None,
        symmetric: bool = False,
        float_zero: bool = False,
    ) -> Int4Linear:
        N, K = codes.shape
        module = cls(K, N, bias is not None, K // scales.shape[1], symmetric, float_zero)
        module.qweight.copy_(pack_int4(codes))
        module.scales.copy_(scales.to(torch.float16))
        if module.float_zero:
            module.offsets.copy_((-zeros.float() * scales.float()).to(torch.float16))
        else:
            module.zeros.copy_(zeros.to(torch.uint8))
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        return module

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        group_size: int = 128,
        symmetric: bool = False,
        float_zero: bool = False,
    ) -> Int4Linear:
        codes, scales, zeros = quantize_int4(weight, group_size, symmetric, float_zero)
        return cls.from_codes(codes, scales, zeros, bias, symmetric, float_zero)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False, float_zero: bool = False
    ) -> Int4Linear:
        return cls.from_weight(linear.weight, linear.bias, group_size, symmetric, float_zero)

    def codes(self) -> Tensor:
        return unpack_int4(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.float_zero:
            g = self.group_size
            q = self.codes().float().reshape(self.out_features, -1, g)
            w = q * self.scales.float()[..., None] + self.offsets.float()[..., None]
            return w.reshape(self.out_features, self.in_features).to(dtype)
        return dequantize_int4(self.codes(), self.scales, self.zeros, dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_cache.clear()  # new codes: the kernel layout must be rebuilt
        super()._load_from_state_dict(*args, **kwargs)

    def _kernel_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cached = self._kernel_cache.get(dtype)
        if cached is None:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 2)
            scale = self.scales.float()
            # The kernel computes (q - 8) * scale + bias_g.
            if self.float_zero:
                bias_g = 8 * scale + self.offsets.float()
            else:
                bias_g = (8 - self.zeros.float()) * scale
            scale_and_zero = torch.stack([scale.t(), bias_g.t()], dim=-1).contiguous().to(dtype)
            cached = self._kernel_cache[dtype] = (packed, scale_and_zero)
        return cached

    def kernel_ok(self, x: Tensor) -> bool:
        # The CPU kernel also needs N % 16 == 0 (its tile width); other shapes take the reference path.
        return super().kernel_ok(x) and self.out_features % 16 == 0

    def forward(self, x: Tensor) -> Tensor:
        if not self.kernel_ok(x):
            return super().forward(x)
        packed, scale_and_zero = self._kernel_weights(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features), packed, self.group_size, scale_and_zero
        )
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        zero = "float" if self.float_zero else "int"
        return (
            f"{super().extra_repr()}, group_size={self.group_size}, symmetric={self.symmetric}, zero={zero}"
        )
