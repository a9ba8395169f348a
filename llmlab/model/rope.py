"""Rotary position embeddings with the scaling schemes used by real checkpoints.

The frequency formulas follow the papers (and transformers' implementations, which the parity tests
check against): position interpolation (linear), NTK-aware (static and dynamic), YaRN and Llama-3.1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from llmlab.model.config import ModelConfig


def base_inv_freq(dim: int, theta: float) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig, seq_len: int | None = None) -> tuple[Tensor, float]:
    """Return ``(inv_freq [dim/2], attention_scale)`` for the config's scaling scheme.

    ``seq_len`` only matters for ``dynamic`` NTK, whose base grows with the longest position seen.
    """
    dim = cfg.dim_head
    theta = cfg.rope_theta
    rs = cfg.rope_scaling
    kind, factor = rs.type, rs.factor
    original = rs.original_max_seq_len or cfg.max_seq_len
    if kind == "none":
        return base_inv_freq(dim, theta), 1.0
    if kind == "linear":
        return base_inv_freq(dim, theta) / factor, 1.0
    if kind == "ntk":
        return base_inv_freq(dim, theta * factor ** (dim / (dim - 2))), 1.0
    if kind == "dynamic":
        seq_len = max(seq_len or original, original)
        base = theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
        return base_inv_freq(dim, base), 1.0
    if kind == "yarn":
        if rs.attention_factor is not None:
            attention_factor = rs.attention_factor
        elif rs.mscale and rs.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rs.mscale) / _yarn_mscale(factor, rs.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
        if rs.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        extrapolation_weight = 1 - ramp
        inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
        return inv_freq, attention_factor
    if kind == "llama3":
        inv_freq = base_inv_freq(dim, theta)
        low_wavelen = original / rs.low_freq_factor
        high_wavelen = original / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"unknown rope scaling {kind!r}")


class RotaryEmbedding(nn.Module):
    """Caches cos/sin tables and looks them up by absolute position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, scale = rope_frequencies(cfg)
        self.attention_scale = scale
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table_len = 0
        self._dynamic_len = 0
        self.register_buffer("cos_table", torch.empty(0), persistent=False)
        self.register_buffer("sin_table", torch.empty(0), persistent=False)
        if cfg.rope_scaling.type != "dynamic":
            self._build(cfg.max_seq_len, inv_freq.device)  # now, not in a (compiled) forward: see forward

    def _build(self, length: int, device: torch.device) -> None:
        if self.cfg.rope_scaling.type == "dynamic":
            inv_freq, _ = rope_frequencies(self.cfg, seq_len=length)
            self.inv_freq = inv_freq.to(device)
        pos = torch.arange(length, device=device, dtype=torch.int64).float()
        freqs = torch.outer(pos, self.inv_freq.to(device).float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_table = emb.cos() * self.attention_scale
        self.sin_table = emb.sin() * self.attention_scale
        self._table_len = length

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions ``[B, T]`` (int) -> cos, sin ``[B, 1, T, head_dim]`` in fp32."""
        if (
            torch.compiler.is_compiling()
            and self.cfg.rope_scaling.type != "dynamic"
            and self._table_len >= self.cfg.max_seq_len
            and self.cos_table.device == positions.device
        ):
            # Reading the largest position back to Python would split the compiled graph in two; the table
            # already covers the model's context, and a position past it fails the compiled index check.
            return self.cos_table[positions].unsqueeze(1), self.sin_table[positions].unsqueeze(1)
        needed = int(positions.max()) + 1 if positions.numel() else 1
        if self.cfg.rope_scaling.type == "dynamic":
            # transformers' dynamic NTK recomputes the base from the longest sequence in the batch.
            original = self.cfg.rope_scaling.original_max_seq_len or self.cfg.max_seq_len
            want = max(needed, original)
            if want != self._dynamic_len or self.cos_table.device != positions.device:
                self._build(want, positions.device)
                self._dynamic_len = want
        elif needed > self._table_len or self.cos_table.device != positions.device:
            self._build(max(needed, self.cfg.max_seq_len), positions.device)
        return self.cos_table[positions].unsqueeze(1), self.sin_table[positions].unsqueeze(1)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` (the half-split layout of transformers' Llama)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
