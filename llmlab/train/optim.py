"""AdamW with decoupled weight-decay groups, and the learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmlab.errors import ConfigError
from llmlab.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; 1-D params (biases, norm gains) and embeddings do not.

    Only trainable parameters are included, so freezing a base model (LoRA) needs nothing else. Embedding
    tables are excluded from decay as in GPT-NeoX/OLMo: decay pulls rare-token rows to zero.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # tied weights appear once
        (no_decay if p.ndim < 2 or id(p) in embedding_params else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused where the parameters' device supports it (CPU and CUDA do in torch >= 2.4)."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # e.g. DTensor params or a device without the fused kernel
        return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    - warmup: linear from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps``;
    - ``cosine``: half-cosine from ``lr`` to ``min_lr`` at ``max_steps``;
    - ``wsd``: flat ``lr`` until the last ``decay_frac * max_steps`` steps, then linear to ``min_lr``;
    - ``constant``: flat ``lr`` after warmup.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    total = max(cfg.max_steps, 1)
    if cfg.schedule == "wsd":
        decay_steps = max(int(round(cfg.decay_frac * total)), 1)
        decay_start = total - decay_steps
        if step < decay_start:
            return cfg.lr
        frac = min((step - decay_start + 1) / decay_steps, 1.0)
        return cfg.lr + frac * (cfg.min_lr - cfg.lr)
    span = max(total - cfg.warmup_steps, 1)
    frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)
