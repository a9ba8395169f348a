"""How to quantize: :class:`QuantConfig`, the named presets, which layers are quantized and the int4 group size
(:func:`resolve_group_size` picks it per model when unset; :func:`check_shapes` names the sizes that fit)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from llmlab.errors import ConfigError
from llmlab.quant.common import INT4_GROUP_SIZES, valid_group_sizes

SCHEMES = ("int8", "int4", "nf4")
AUTO_MAX_GROUP = 128  # int4 auto group size: the largest of 128, 64, 32 that divides every quantized layer


@dataclass
class QuantConfig:
    """How to quantize.

    ``group_size`` is the int4 group (32/64/128/256; None: the largest of 128, 64, 32 that divides every
    quantized layer's in_features, chosen by :func:`resolve_group_size`) and the NF4 block size (default 64);
    int8 always uses one scale per output channel.
    """

    scheme: str = "int8"
    group_size: int | None = None
    symmetric: bool = False  # int4 only; int8 is always symmetric, NF4 has no zero point
    float_zero: bool = False  # int4 asymmetric: w = q * scale + min (fp16 offset) instead of an integer zero
    double_quant: bool = True  # NF4: quantize the block maxima again (QLoRA)
    include_head: bool = False  # also quantize an untied lm_head
    gptq: bool = False
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    act_order: bool = False
    awq: bool = False
    awq_grid: int = 20
    awq_max_tokens: int = 4096  # calibration tokens used by the AWQ search (per linear group)
    calib_data: str = "wikitext2-valid"  # bundled corpus name or a text file
    calib_samples: int = 32
    calib_seq_len: int = 256
    seed: int = 0

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(
                f"unknown quantization scheme '{self.scheme}' (choose one of {', '.join(SCHEMES)})"
            )
        if self.group_size is None and self.scheme == "nf4":
            self.group_size = 64
        if self.scheme == "int4" and self.group_size is not None and self.group_size not in INT4_GROUP_SIZES:
            raise ConfigError(
                f"int4 group size must be 32, 64, 128 or 256 (or unset: chosen per model), got {self.group_size}"
            )
        if self.scheme == "nf4" and self.group_size <= 0:
            raise ConfigError(f"NF4 block size must be positive, got {self.group_size}")
        if self.gptq and self.scheme == "nf4":
            raise ConfigError("GPTQ is implemented for int8 and int4, not NF4 (use --awq with nf4)")
        if not 0 < self.gptq_damp < 1:
            raise ConfigError(f"gptq_damp must be in (0, 1), got {self.gptq_damp}")
        if self.calib_samples <= 0 or self.calib_seq_len <= 1:
            raise ConfigError("calib_samples must be > 0 and calib_seq_len > 1")
        if self.awq_grid < 2:
            raise ConfigError(f"awq_grid must be >= 2, got {self.awq_grid}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Named presets for ``llmlab quantize --preset``. The int4 ones leave the group size to
# resolve_group_size, as ``--scheme int4`` does, so a preset and the flag give the same checkpoint.
QUANT_PRESETS: dict[str, QuantConfig] = {
    "int8": QuantConfig(scheme="int8"),
    "int4": QuantConfig(scheme="int4"),
    "int4-gptq": QuantConfig(scheme="int4", gptq=True),
    "int4-awq": QuantConfig(scheme="int4", awq=True),
    "nf4": QuantConfig(scheme="nf4", group_size=64),
}


def target_names(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Names of the linears to quantize: every ``nn.Linear`` in the blocks (+ an untied head if asked)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")]
    if cfg.include_head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        names.append("lm_head")
    return names


def resolve_group_size(model: nn.Module, cfg: QuantConfig) -> str | None:
    """Pick the int4 group size when ``cfg.group_size`` is None (sets it; returns a line saying so).

    One size for the whole model (the fused q/k/v and gate/up kernels need one): the largest of 128, 64,
    32 that divides every quantized layer's in_features. SmolLM2 (d_model 576 = 4.5 x 128) gets 64.
    """
    if cfg.scheme != "int4" or cfg.group_size is not None:
        return None
    widths = sorted({model.get_submodule(n).in_features for n in target_names(model, cfg)})
    valid = [g for g in valid_group_sizes(widths) if g <= AUTO_MAX_GROUP]
    if not valid:
        raise ConfigError(
            f"int4: no group size ({', '.join(map(str, INT4_GROUP_SIZES))}) divides every layer's in_features "
            f"({', '.join(map(str, widths))}): use --scheme int8 or nf4"
        )
    cfg.group_size = valid[-1]
    why = "" if cfg.group_size == AUTO_MAX_GROUP else f"; {AUTO_MAX_GROUP} does not divide all of them"
    return (
        f"int4 group size {cfg.group_size} (auto: the largest of 128/64/32 dividing every layer's in_features "
        f"{', '.join(map(str, widths))}{why})"
    )


def check_shapes(model: nn.Module, cfg: QuantConfig) -> None:
    """Fail before any work if a layer's in_features is not a multiple of the group size (the hint names
    the group sizes that divide every layer of this model)."""
    if cfg.scheme != "int4" or cfg.group_size is None:
        return
    names = target_names(model, cfg)
    widths = sorted({model.get_submodule(n).in_features for n in names})
    for name in names:
        width = model.get_submodule(name).in_features
        if width % cfg.group_size:
            valid = valid_group_sizes(widths)
            hint = (
                f"group sizes that divide every layer of this model: {', '.join(map(str, valid))}"
                if valid
                else "no int4 group size divides every layer: use int8 or nf4"
            )
            raise ConfigError(
                f"group size {cfg.group_size} does not divide in_features={width} of '{name}' ({hint}; "
                "or leave the group size unset to pick the largest that fits)"
            )
