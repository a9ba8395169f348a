"""Turn a mapped state dict into a :class:`Transformer` without a wasted init or a second copy."""

from __future__ import annotations

import torch
from torch import Tensor

from llmlab.model.checkpoint import check_state
from llmlab.model.config import ModelConfig
from llmlab.model.transformer import Transformer


def build_model(
    cfg: ModelConfig,
    state: dict[str, Tensor],
    source: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """A :class:`Transformer` holding ``state`` (strictly checked), in eval mode.

    The model is created on the meta device and then adopts the state's tensors (``assign=True``), so no time
    goes into a random init that is overwritten, nor into a second copy of every weight (for SmolLM2-135M
    that copy alone costs seconds on a busy 2-core machine). ``dtype`` None means fp32: the fastest CPU
    decode path and the one the parity tests use.
    """
    from llmlab.model.checkpoint import _rebuild_buffers

    dtype = dtype or torch.float32
    state = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()
    }
    with torch.device("meta"):
        model = Transformer(cfg)
    check_state(model, state, source)
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (RoPE tables, ALiBi slopes) were created on meta: rebuild them for real.
    _rebuild_buffers(model)
    return model.eval()


__all__ = ["build_model", "check_state"]
