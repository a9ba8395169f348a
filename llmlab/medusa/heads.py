"""Medusa heads (Cai et al. 2024): K extra decoding heads on a frozen base model's last hidden state.

Head ``k`` (``k = 1..K``) reads the final-norm hidden state ``h_t`` at position ``t`` -- the state whose LM
head output is the next token ``x_{t+1}`` -- and predicts the token after it by ``k`` more, ``x_{t+1+k}``::

    head_k(h) = W_k · ResBlock_k(h),   ResBlock(h) = h + SiLU(A h + b)   (A initialised to zero)

``W_k`` is the base's own LM head, shared and frozen (``share_lm_head=True``, the default: only the residual
blocks train, a few hundred thousand parameters for a 135M model), or a trainable copy of it per head
(``share_lm_head=False``, the paper's Medusa-1 layout). With ``A = 0`` every head starts out as the base's
own next-token head shifted by ``k``; training moves it to the token ``k`` further on.

On disk, a heads directory holds ``medusa_config.json`` (:class:`MedusaConfig`: sizes and the base it was
trained on) and ``medusa_heads.safetensors`` (the head weights only; the shared LM head is never copied).
:func:`load_heads` checks the sizes against the model it will run on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from llmlab.errors import CheckpointError, ConfigError

CONFIG_FILE = "medusa_config.json"
WEIGHTS_FILE = "medusa_heads.safetensors"

LMHead = Callable[[Tensor], Tensor]


@dataclass
class MedusaConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1  # residual blocks per head
    share_lm_head: bool = True  # True: the base's LM head projects every head (frozen, not saved)
    base_model: str | None = None  # what the heads were trained on (informational)

    def validate(self) -> None:
        for name in ("hidden_size", "vocab_size", "num_heads", "num_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"medusa config key '{name}' must be positive, got {getattr(self, name)}")


class ResBlock(nn.Module):
    """``h + SiLU(A h + b)`` with ``A = 0`` at initialisation (the block starts near the identity)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """``K`` heads over hidden states ``[..., D]`` → logits ``[..., K, V]`` (see the module docstring).

    ``config`` is named so (not ``cfg``) on purpose: the Trainer reads a model's ``cfg`` as a Transformer
    config for its MFU estimate, which these heads are not.
    """

    def __init__(self, config: MedusaConfig, lm_head_weight: Tensor | None = None):
        super().__init__()
        config.validate()
        self.config = config
        D, V = config.hidden_size, config.vocab_size
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(D) for _ in range(config.num_layers)]) for _ in range(config.num_heads)
        )
        self.proj: nn.ModuleList | None = None
        if not config.share_lm_head:
            self.proj = nn.ModuleList(nn.Linear(D, V, bias=False) for _ in range(config.num_heads))
            if lm_head_weight is not None:  # Medusa-1: each head starts from a copy of the LM head
                with torch.no_grad():
                    for p in self.proj:
                        p.weight.copy_(lm_head_weight)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def states(self, hidden: Tensor, num: int | None = None) -> Tensor:
        """The first ``num`` (default: all) heads' residual-block outputs ``[..., num, D]``."""
        return torch.stack([blk(hidden) for blk in self.blocks[:num]], dim=-2)

    def projections(self, lm_head_weight: Tensor) -> list[Tensor]:
        """Each head's output matrix ``[V, D]``: the shared LM head ``K`` times, or the heads' own copies."""
        if self.proj is None:
            return [lm_head_weight] * self.num_heads
        return [p.weight for p in self.proj]

    def forward(self, hidden: Tensor, lm_head: LMHead | None = None, num: int | None = None) -> Tensor:
        """Logits ``[..., num, V]`` of the first ``num`` heads (default: all); ``lm_head`` (the base's head)
        is required when the heads share it."""
        states = self.states(hidden, num)
        if self.proj is None:
            if lm_head is None:
                raise ValueError("these Medusa heads share the base's LM head: pass lm_head")
            return lm_head(states)
        return torch.stack([p(states[..., k, :]) for k, p in zip(range(states.shape[-2]), self.proj)], dim=-2)


def heads_for(model: nn.Module, num_heads: int, num_layers: int = 1, share_lm_head: bool = True,
              base_model: str | None = None) -> MedusaHeads:  # fmt: skip
    """Fresh heads sized for ``model`` (an llmlab Transformer), on its device and in float32."""
    cfg = MedusaConfig(
        model.cfg.d_model, model.cfg.vocab_size, num_heads, num_layers, share_lm_head, base_model
    )
    head = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight
    heads = MedusaHeads(cfg, None if share_lm_head else head.detach().float())
    return heads.to(head.device)


def save_heads(heads: MedusaHeads, out_dir: str | Path) -> Path:
    """Write ``medusa_config.json`` + ``medusa_heads.safetensors`` into ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in heads.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(asdict(heads.config), indent=2) + "\n", encoding="utf-8")
    return out


def check_heads(cfg: MedusaConfig, model: nn.Module, where: str) -> None:
    """One clear error when heads made for another base meet ``model`` (hidden size or vocabulary)."""
    mc = model.cfg
    for what, theirs, ours in (("hidden size", cfg.hidden_size, mc.d_model),
                               ("vocabulary", cfg.vocab_size, mc.vocab_size)):  # fmt: skip
        if theirs != ours:
            raise CheckpointError(
                f"{where}: Medusa heads for a different base model ({what} {theirs}, the model has {ours}; "
                f"the heads were trained on {cfg.base_model or 'an unknown base'})"
            )


def load_heads(path: str | Path, model: nn.Module | None = None) -> MedusaHeads:
    """Heads from a directory written by :func:`save_heads`, checked against ``model`` when given (same
    hidden size and vocabulary), on its device and in its dtype."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{path}: not a Medusa heads directory (needs {CONFIG_FILE} and {WEIGHTS_FILE}; "
            "make one with 'llmlab medusa MODEL --out DIR')"
        )
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        cfg = MedusaConfig(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{cfg_file}: invalid Medusa config ({exc})") from exc
    if model is not None:
        check_heads(cfg, model, str(cfg_file))
    heads = MedusaHeads(cfg)
    try:
        heads.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not match {CONFIG_FILE} ({exc})") from exc
    if model is not None:
        param = next(model.parameters())
        heads = heads.to(device=param.device, dtype=param.dtype)
    return heads.eval().requires_grad_(False)
