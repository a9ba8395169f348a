"""Post-training weight-only quantization: int8 per-channel, int4 group-wise, NF4; GPTQ and AWQ options.

- ``quantize_nf4`` / ``dequantize_nf4`` / :class:`NF4Linear`: NF4 with double quantization (QLoRA's base).
- :class:`Int8Linear`, :class:`Int4Linear`: frozen linears running PyTorch's CPU int8/int4 GEMM kernels.
- ``quantize_model(model, QuantConfig(...), tokenizer)`` quantizes a Transformer in place (int4 group size:
  the largest of 128/64/32 that fits, unless set); ``dequantize_model`` turns it back into float linears;
  ``save_quantized`` / ``load_quantized`` write and read the quantized checkpoint directory.

Exports are lazy so ``llmlab.quant.cli`` (imported by ``llmlab --help``) does not pull in torch.
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

_LAZY = {
    "AffineQuantizer": "llmlab.quant.common",
    "QuantLinear": "llmlab.quant.common",
    "dequantize_model": "llmlab.quant.common",
    "resolve_group_size": "llmlab.quant.config",
    "Int4Linear": "llmlab.quant.int4",
    "quantize_int4": "llmlab.quant.int4",
    "dequantize_int4": "llmlab.quant.int4",
    "Int8Linear": "llmlab.quant.int8",
    "quantize_int8": "llmlab.quant.int8",
    "dequantize_int8": "llmlab.quant.int8",
    "NF4Linear": "llmlab.quant.nf4",
    "NF4Tensor": "llmlab.quant.nf4",
    "quantize_nf4": "llmlab.quant.nf4",
    "dequantize_nf4": "llmlab.quant.nf4",
    "QUANT_PRESETS": "llmlab.quant.quantize",
    "QuantConfig": "llmlab.quant.quantize",
    "quantize_model": "llmlab.quant.quantize",
    "save_quantized": "llmlab.quant.quantize",
    "load_quantized": "llmlab.quant.quantize",
    "model_bytes": "llmlab.quant.quantize",
}


__getattr__ = lazy_exports("llmlab.quant", _LAZY)


__all__ = sorted(_LAZY)
