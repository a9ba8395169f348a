"""QLoRA's base swap: the frozen target ``nn.Linear`` layers become NF4 (:mod:`llmlab.quant.nf4`), then LoRA
(:mod:`llmlab.model.lora`) wraps them. It lives in ``quant/`` so that ``model/`` never imports ``quant/``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from llmlab.errors import ConfigError
from llmlab.model.lora import matches_targets, target_names
from llmlab.quant.nf4 import NF4Linear


def quantize_for_qlora(
    model: nn.Module, targets: Sequence[str], block_size: int = 64, double_quant: bool = True
) -> dict[str, int]:
    """Replace the frozen target ``nn.Linear`` layers by NF4 (dequantized on the fly in each forward).

    Call before :func:`apply_lora`, which then wraps the NF4 layers. Returns the base-weight bytes before
    (fp32 and bf16 equivalents) and after, for the report.
    """
    names = target_names(targets)
    before = after = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not matches_targets(name, names):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = NF4Linear.from_linear(module, block_size=block_size, double_quant=double_quant)
        before += module.weight.numel()
        after += q.weight_bytes()
        setattr(parent, leaf, q)
    if before == 0:
        raise ConfigError(f"no linear layer matches the QLoRA targets {names}")
    return {
        "base_params_quantized": before,
        "fp32_bytes": 4 * before,
        "bf16_bytes": 2 * before,
        "nf4_bytes": after,
    }
