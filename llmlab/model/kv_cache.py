"""Contiguous, preallocated KV cache for incremental decoding.

Keys and values live in one ``[layers, B, kv_heads, max_len, head_dim]`` tensor each. Only the KV heads are
stored (GQA/MQA), so the cache costs ``2 * layers * kv_heads * head_dim * bytes`` per token. Rows may hold
sequences of different lengths: each row writes its new tokens at its own offset.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmlab.model.config import ModelConfig
from llmlab.model.transformer import AttnMeta, build_mask


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, max_len, cfg.dim_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.batch_size = batch_size
        self.lengths = [0] * batch_size  # tokens committed per row (python ints: no device syncs)
        self._pending: tuple[list[int], int] | None = None

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * cfg.n_layers * cfg.kv_heads * cfg.dim_head * torch.empty((), dtype=dtype).element_size()

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reset(self, rows: list[int] | None = None) -> None:
        for r in rows if rows is not None else range(self.batch_size):
            self.lengths[r] = 0

    def prepare(self, num_new: int, cfg: ModelConfig) -> AttnMeta:
        starts = list(self.lengths)
        end = max(starts) + num_new
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self._pending = (starts, num_new)
        device = self.k.device
        start_t = torch.tensor(starts, device=device)
        q_pos = start_t[:, None] + torch.arange(num_new, device=device)[None, :]
        uniform = all(s == starts[0] for s in starts)
        window = cfg.sliding_window
        if uniform and num_new == 1 and (window is None or end <= window):
            return AttnMeta(q_pos=q_pos, mask=None, is_causal=False)  # one query sees every cached key
        if uniform and starts[0] == 0 and (window is None or end <= window):
            return AttnMeta(q_pos=q_pos, mask=None, is_causal=True)
        k_pos = torch.arange(end, device=device)[None, :].expand(self.batch_size, end)
        k_valid = k_pos < (start_t[:, None] + num_new)
        return AttnMeta(q_pos=q_pos, mask=build_mask(q_pos, k_pos, k_valid, window), is_causal=False)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        assert self._pending is not None, "prepare() must be called before update()"
        starts, n = self._pending
        ck, cv = self.k[layer], self.v[layer]
        if all(s == starts[0] for s in starts):
            s = starts[0]
            ck[:, :, s : s + n] = k
            cv[:, :, s : s + n] = v
        else:
            for row, s in enumerate(starts):
                ck[row, :, s : s + n] = k[row]
                cv[row, :, s : s + n] = v[row]
        end = max(starts) + n
        return ck[:, :, :end], cv[:, :, :end]

    def advance(self, num_new: int) -> None:
        assert self._pending is not None
        starts, n = self._pending
        self.lengths = [s + n for s in starts]
        self._pending = None
