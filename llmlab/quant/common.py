"""Pieces shared by every weight-only scheme: the quantized-linear base class and affine (integer) rounding.

A quantized linear keeps its weight as integer codes plus scales in *buffers* (so ``state_dict`` and
safetensors carry them) and never as a trainable ``nn.Parameter``. Subclasses say how to rebuild the float
weight (:meth:`QuantLinear.dequantize`) and may override ``forward`` with a fused low-bit kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.errors import ConfigError


class QuantLinear(nn.Module):
    """Base of the frozen quantized linears: ``y = x @ dequantize(W).T + b``.

    Subclasses with a fused low-bit kernel use it only where it wins (measured on the 2-core AVX-512/AMX
    CPU, see ``bench/quant.py``): bf16 activations and few rows, i.e. decode. PyTorch's int8/int4 CPU
    kernels are 4-40x slower than the float GEMM with fp32 activations, and slower than "dequantize, then
    one bf16 GEMM" for prefill-sized inputs (hundreds of rows), so those take the dequantize path.
    """

    use_kernel = True  # class-wide switch: False forces the dequantize-then-matmul reference path
    kernel_max_rows = 256  # above this many input rows, dequantize + float GEMM is faster

    def __init__(
        self, in_features: int, out_features: int, bias: bool, bias_dtype: torch.dtype = torch.float32
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight ``[out_features, in_features]`` the codes stand for."""
        raise NotImplementedError

    def _apply(self, fn, recurse: bool = True):
        """``model.to(dtype)`` must not recast codes and scales (fp16 -> bf16 would lose scale bits):
        quantized buffers follow device moves only; the bias follows dtype changes too."""
        keep = {n: b for n, b in self._buffers.items() if b is not None and n != "bias"}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def weight_bytes(self) -> int:
        """Bytes of the stored weight (codes + scales + zeros), bias excluded."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False) if n != "bias")

    def kernel_ok(self, x: Tensor) -> bool:
        """Whether the fused low-bit kernel (if the subclass has one) should run for input ``x``."""
        return (
            self.use_kernel
            and x.device.type == "cpu"
            and x.dtype == torch.bfloat16
            and x.numel() // self.in_features <= self.kernel_max_rows
        )

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel (tinygemm layout) accepts


def valid_group_sizes(in_features: list[int] | tuple[int, ...]) -> list[int]:
    """The int4 group sizes that divide every one of ``in_features``."""
    return [g for g in INT4_GROUP_SIZES if all(k % g == 0 for k in in_features)]


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> None:
    if group_size <= 0 or in_features % group_size:
        valid = valid_group_sizes([in_features])
        hint = (
            f"group sizes that divide it: {', '.join(map(str, valid))}"
            if valid
            else "no int4 group size does"
        )
        raise ConfigError(
            f"group size {group_size} does not divide in_features={in_features} of '{name}' ({hint})"
        )


@dataclass
class AffineQuantizer:
    """Round-to-nearest integer quantization ``w ~ (q - zero) * scale`` with ``q`` in ``[qmin, qmax]``.

    One (scale, zero) pair per output row and per group of ``group_size`` input columns. Symmetric
    quantization fixes the zero point at the middle of the range; asymmetric stretches ``[min, max]`` of
    each group (always including 0, so zero is exactly representable) over the full range; with
    ``float_zero`` it stretches exactly ``[min, max]`` and the zero point is ``-min / scale`` unrounded
    (``w ~ q * scale + min``, llama.cpp's Q4_1 and the CPU int4 kernel's native form). Used by
    round-to-nearest and by GPTQ, which calls :meth:`fit` once per group and :meth:`quantize` per column.
    """

    qmin: int
    qmax: int
    symmetric: bool
    group_size: int
    scale_dtype: torch.dtype | None = None  # storage dtype of the scales (e.g. fp16); None: fp32
    float_zero: bool = False  # asymmetric only: zero = -min/scale, not rounded to an integer

    def _stored_scale(self, scale: Tensor) -> Tensor:
        """Round scales up to the storage dtype, so the grid still covers [min, max] and codes are computed
        against exactly the value that is stored."""
        if self.scale_dtype is None:
            return scale
        low = scale.to(self.scale_dtype)
        up = torch.nextafter(low, torch.full_like(low, float("inf")))
        return torch.where(low.float() < scale, up, low).float()

    @property
    def mid(self) -> int:
        return (self.qmin + self.qmax + 1) // 2

    def fit(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``w [N, g]`` -> per-row ``scale [N]`` and integer-valued ``zero [N]`` (float tensors)."""
        w = w.float()
        if self.symmetric:
            # Largest magnitude maps to the largest positive code, so nothing is clipped.
            amax = w.abs().amax(dim=1)
            scale = self._stored_scale(amax / (self.qmax - self.mid))
            zero = torch.full_like(scale, float(self.mid))
        elif self.float_zero:
            wmin = w.amin(dim=1)
            if self.scale_dtype is not None:
                wmin = wmin.to(self.scale_dtype).float()  # the offset is stored in the scales' dtype
            scale = (w.amax(dim=1) - wmin) / (self.qmax - self.qmin)
            # Nearest (not rounded-up) storage value: grids that were fp16 to begin with (a Q4_1 GGUF's)
            # are then reproduced exactly; the top code may overshoot the max by a few fp16 ulps.
            scale = scale.to(self.scale_dtype).float() if self.scale_dtype is not None else scale
            zero = self.qmin - wmin / torch.where(scale > 0, scale, torch.ones_like(scale))
        else:
            wmin = w.amin(dim=1).clamp(max=0)
            wmax = w.amax(dim=1).clamp(min=0)
            scale = self._stored_scale((wmax - wmin) / (self.qmax - self.qmin))
            zero = torch.round(self.qmin - wmin / scale.clamp(min=1e-12)).clamp(self.qmin, self.qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
        return scale, zero

    def quantize(self, w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """Integer codes (as float) of ``w [N, ...]`` with per-row ``scale``/``zero`` broadcast on dim 0."""
        shape = (-1,) + (1,) * (w.dim() - 1)
        return torch.clamp(
            torch.round(w.float() / scale.view(shape) + zero.view(shape)), self.qmin, self.qmax
        )

    @staticmethod
    def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (q.dim() - 1)
        return (q - zero.view(shape)) * scale.view(shape)

    def quantize_matrix(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Round-to-nearest of a whole ``[N, K]`` matrix -> codes ``[N, K]``, scales and zeros ``[N, K/g]``."""
        N, K = w.shape
        g = self.group_size
        groups = w.float().reshape(N, K // g, g)
        flat = groups.reshape(N * (K // g), g)
        scale, zero = self.fit(flat)
        codes = self.quantize(flat, scale, zero).reshape(N, K)
        return codes, scale.reshape(N, K // g), zero.reshape(N, K // g)

    def dequantize_matrix(self, codes: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
        N, K = codes.shape
        g = K // scales.shape[1]
        q = codes.float().reshape(N, K // g, g)
        return ((q - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).reshape(N, K)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's quantized linears by module name (empty for a float model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every :class:`QuantLinear` by an ``nn.Linear`` holding the weight its codes stand for, in place.

    Formats that have no slot for llmlab's codes and scales (a Hugging Face directory, GGUF, a plain llmlab
    checkpoint) get these float weights: the model computes the same function, at float size. Returns the
    names of the layers that were replaced.
    """
    replaced = quantized_layers(model)
    for name, module in replaced.items():
        weight = module.dequantize(dtype)
        linear = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return list(replaced)
