"""Paged KV cache: fixed-size blocks shared by many sequences (vLLM's PagedAttention layout, in PyTorch).

Memory is one pool of ``num_blocks * block_size`` token slots per layer, stored as ``[slots, kv_heads,
head_dim]`` for keys and values (only the KV heads: GQA/MQA pay ``2 * layers * kv_heads * head_dim * bytes``
per token). Each sequence owns a *block table* (a list of block ids); token ``i`` of a sequence lives in slot
``table[i // block_size] * block_size + i % block_size``. Blocks come from a free list and go back to it when
a sequence finishes, is cancelled or is preempted, so many requests of different lengths share the pool
without fragmentation.

The cache implements the model's cache protocol (``prepare / update / advance``) over the *batch* chosen by
:meth:`PagedKVCache.set_batch`: row ``b`` of the model's input is sequence ``batch[b]``. ``update`` writes
the new keys/values into their slots (one ``index_copy_``) and gathers each row's keys/values (one
``index_select``) padded to the longest row; the mask hides the padding.

**Prefix caching (vLLM's automatic prefix caching).** With ``prefix_caching=True`` every full block is keyed
by ``hash((parent block's key, its token ids))``, so a key names the whole prefix up to that block. A new
sequence starts on the cached blocks of its longest cached prefix (shared, reference-counted, never written:
writes go past a sequence's length and shared blocks are full), leaving at least one token to compute.
Blocks nobody uses stay cached until the free list runs dry, then the least recently freed is evicted.

**Attention sinks (StreamingLLM, Xiao et al. 2023).** With ``sinks=(S, W)`` a sequence keeps its first
``S`` tokens (rounded up to whole blocks) plus the most recent ``W`` or more; older blocks are freed, so
memory stays bounded however long generation runs. Positions are *positions in the cache* (as in the
paper), so a query never sees a relative distance the model was not trained on. When a block is evicted
the keys after it move ``block_size`` positions down: they are re-rotated by ``-block_size`` with RoPE
(a rotation composes with a rotation), which is exact for every static RoPE scaling.

**Sliding window (Mistral).** Without sinks, a model whose config has ``sliding_window=W`` frees every
block whose keys no later query can see (all positions ``<= length - W``) before each forward, and gathers
keys only from the oldest block still held, so both memory and attention cost stay bounded by the window
while positions keep their absolute values (nothing is re-rotated). Rollback (``truncate``) never needs a
freed block: it only drops tokens added after the forward that freed them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.model.config import ModelConfig
from llmlab.model.rope import rotate_half
from llmlab.model.transformer import AttnMeta, build_mask


class CacheFullError(LLMLabError):
    """No free block left in the KV cache pool."""


class BlockAllocator:
    """A free list of block ids with reference counts, and an LRU list of unreferenced *cached* blocks.

    A block that holds a cached prefix (``keep(block)`` was called) is not returned to the free list when
    its last user frees it: it waits in ``cached`` (oldest first) until a new request shares it again or
    the free list runs dry, when the least recently freed one is evicted (``on_evict``) and reused.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.ref = [0] * num_blocks
        self.kept: set[int] = set()  # blocks registered in the prefix cache
        self.cached: OrderedDict[int, None] = OrderedDict()  # kept blocks nobody uses, LRU first
        self.on_evict: Callable[[int], None] | None = None

    @property
    def num_free(self) -> int:
        """Blocks a new allocation can take: free ones plus evictable cached ones."""
        return len(self._free) + len(self.cached)

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self.cached:
            block, _ = self.cached.popitem(last=False)
            self.kept.discard(block)
            if self.on_evict is not None:
                self.on_evict(block)
        else:
            raise CacheFullError(f"KV cache is full ({self.num_blocks} blocks in use)")
        self.ref[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more user of a cached block."""
        self.ref[block] += 1
        self.cached.pop(block, None)

    def free(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # a sequence's tail first: evicted before the prefix it extends
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if block in self.kept:
                    self.cached[block] = None
                else:
                    self._free.append(block)


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens held in the cache (after evictions)
    evicted: int = 0  # tokens dropped by the attention-sink window
    dropped: int = 0  # leading blocks freed by the sliding window: token i lives in blocks[i // bs - dropped]
    hashes: list[int] = field(default_factory=list)  # prefix-cache hash chain of its leading full blocks


class PagedKVCache:
    """Block-paged KV cache for many sequences; see the module docstring."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        sinks: tuple[int, int] | None = None,
        rope_inv_freq: Tensor | None = None,
        prefix_caching: bool = False,
    ):
        if num_blocks <= 0 or block_size <= 0:
            raise LLMLabError(
                f"paged KV cache needs positive num_blocks/block_size, got {num_blocks}/{block_size}"
            )
        self.cfg = cfg
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (cfg.n_layers, num_blocks * block_size, cfg.kv_heads, cfg.dim_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks)
        self.seqs: dict[int, _Seq] = {}
        self.batch: list[int] = []
        self.sinks = sinks
        # Sliding-window block freeing (the sink window replaces it when both are set).
        self.window = cfg.sliding_window if sinks is None else None
        if sinks is not None:
            if cfg.position != "rope" or rope_inv_freq is None:
                raise LLMLabError(
                    "attention sinks need a RoPE model (keys are re-rotated when the window rolls)"
                )
            n_sink, window = sinks
            if n_sink < 0 or window <= 0:
                raise LLMLabError(f"attention sinks need sinks >= 0 and window > 0, got {sinks}")
            self.sink_blocks = -(-n_sink // block_size)
            # Evict once a whole block beyond the window has accumulated.
            self.max_cached = self.sink_blocks * block_size + window + block_size
            self.inv_freq = rope_inv_freq.float().to(device)
        self._pending: tuple[Tensor, Tensor, list[int], int] | None = None
        # (depth [T], ancestor-or-self [T, T]): the next forward's new tokens are a candidate tree (Medusa
        # speculative decoding); prepare() consumes it. None: a plain causal run.
        self.tree: tuple[Tensor, Tensor] | None = None
        self.prefix_caching = prefix_caching
        if prefix_caching and (sinks is not None or self.window is not None):
            raise LLMLabError("prefix caching does not combine with attention sinks or a sliding window")
        # Prefix cache: hash of (parent hash, block tokens) -> block, and each cached block's key.
        self._hash_to_block: dict[int, int] = {}
        self._block_key: dict[int, tuple[int, int | None, tuple[int, ...]]] = {}
        self.allocator.on_evict = self._forget_block

    # ------------------------------------------------------------------------------- accounting
    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """``2 * layers * kv_heads * head_dim * bytes``: what one cached token costs."""
        return 2 * cfg.n_layers * cfg.kv_heads * cfg.dim_head * torch.empty((), dtype=dtype).element_size()

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_needed(self, seq_id: int | None, num_new: int, chunk: int | None = None) -> int:
        """How many more blocks ``seq_id`` (None: a new sequence) needs to hold ``num_new`` more tokens,
        net of the blocks the sliding window frees first. ``chunk``: a new sequence's tokens arrive in
        forward passes of at most this many, so under a sliding window it never holds more than the window
        plus one chunk."""
        if seq_id is None and chunk is not None and self.window is not None:
            full = -(-num_new // self.block_size)
            return min(full, -(-(self.window + min(chunk, num_new)) // self.block_size) + 1)
        seq = self.seqs.get(seq_id) if seq_id is not None else None
        length, have, dropped = (seq.length, len(seq.blocks), seq.dropped) if seq else (0, 0, 0)
        if self.sinks is not None:
            length = min(length + num_new, self.max_cached)
            return max(0, -(-length // self.block_size) - have)
        freed = self._dead_blocks(length) - dropped if self.window is not None else 0
        return max(0, -(-(length + num_new) // self.block_size) - dropped - have - freed)

    @property
    def num_used_blocks(self) -> int:
        """Blocks some sequence holds (cached blocks nobody uses are not counted: they are reclaimable)."""
        return self.num_blocks - self.allocator.num_free

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks kept for the prefix cache."""
        return len(self.allocator.cached)

    # ----------------------------------------------------------------------------- prefix cache
    def match_prefix(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        """Cached blocks holding the longest block-aligned prefix of ``tokens`` and their hash chain. At
        least one token is left to compute (its logits give the next token), as in vLLM."""
        blocks: list[int] = []
        hashes: list[int] = []
        if not self.prefix_caching:
            return blocks, hashes
        bs = self.block_size
        parent: int | None = None
        for i in range((len(tokens) - 1) // bs):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            h = hash((parent, chunk))
            block = self._hash_to_block.get(h)
            if block is None or self._block_key[block][1:] != (parent, chunk):  # a miss, or a collision
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def blocks_to_admit(self, tokens: list[int], num_new: int, chunk: int | None = None) -> int:
        """Free blocks a new sequence prefilled with ``tokens`` (room for ``num_new`` more) takes from the pool,
        net of the cached blocks it shares (a shared block nobody else uses still leaves the free pool)."""
        hits, _ = self.match_prefix(tokens)
        if not hits:
            return self.blocks_needed(None, len(tokens) + num_new, chunk)
        total = -(-(len(tokens) + num_new) // self.block_size)
        return total - len(hits) + sum(1 for b in hits if self.allocator.ref[b] == 0)

    def cache_full_blocks(self, seq_id: int, tokens: list[int]) -> None:
        """Register the sequence's full blocks in the prefix cache, extending its hash chain. ``tokens`` is
        the sequence's token ids, the newest (not yet in the cache) included: only blocks before it are
        registered, so rows a speculative step wrote past the committed tokens never are. A block whose
        content is already cached elsewhere stays private."""
        seq = self.seqs[seq_id]
        bs = self.block_size
        for i in range(len(seq.hashes), min(seq.length, len(tokens) - 1) // bs):
            parent = seq.hashes[-1] if seq.hashes else None
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            h = hash((parent, chunk))
            block = seq.blocks[i]
            if h not in self._hash_to_block and block not in self._block_key:
                self._hash_to_block[h] = block
                self._block_key[block] = (h, parent, chunk)
                self.allocator.kept.add(block)
            seq.hashes.append(h)

    def _forget_block(self, block: int) -> None:
        h, _, _ = self._block_key.pop(block)
        if self._hash_to_block.get(h) == block:
            del self._hash_to_block[h]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (the weights changed): unused cached blocks return to the free list."""
        while self.allocator.cached:
            block, _ = self.allocator.cached.popitem(last=False)
            self.allocator._free.append(block)
        self.allocator.kept.clear()
        self._hash_to_block.clear()
        self._block_key.clear()
        for seq in self.seqs.values():
            seq.hashes.clear()

    # -------------------------------------------------------------------------------- sequences
    def add_sequence(self, seq_id: int, tokens: list[int] | None = None) -> int:
        """Start a sequence; with prefix caching and its ``tokens``, attach the cached blocks of its longest
        cached prefix. Returns how many tokens it starts with (those the prefill can skip)."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already in the cache")
        seq = self.seqs[seq_id] = _Seq()
        if tokens is not None and self.prefix_caching:
            seq.blocks, seq.hashes = self.match_prefix(tokens)
            for block in seq.blocks:
                self.allocator.share(block)
            seq.length = len(seq.blocks) * self.block_size
        return seq.length

    def _dead_blocks(self, length: int) -> int:
        """Leading blocks no query at position >= ``length`` can see under the sliding window."""
        assert self.window is not None
        return max(0, length - self.window + 1) // self.block_size

    def _release_outside_window(self, seq: _Seq) -> None:
        dead = self._dead_blocks(seq.length)
        if dead > seq.dropped:
            n = dead - seq.dropped
            self.allocator.free(seq.blocks[:n])
            del seq.blocks[:n]
            seq.dropped = dead

    def free_sequence(self, seq_id: int) -> None:
        """Return a finished/cancelled sequence's blocks to the pool (no-op if unknown)."""
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self.allocator.free(seq.blocks)

    def length(self, seq_id: int) -> int:
        return self.seqs[seq_id].length

    def position(self, seq_id: int) -> int:
        """Absolute number of tokens the sequence has seen (cached + evicted)."""
        seq = self.seqs[seq_id]
        return seq.length + seq.evicted

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget tokens past ``length`` (speculative decoding's rollback) and free their blocks."""
        seq = self.seqs[seq_id]
        if length > seq.length:
            raise ValueError("cannot truncate a sequence to a longer length")
        if length < seq.dropped * self.block_size:
            raise ValueError("cannot truncate into blocks the sliding window already freed")
        seq.length = length
        del seq.hashes[length // self.block_size :]
        keep = -(-length // self.block_size) - seq.dropped
        self.allocator.free(seq.blocks[keep:])
        del seq.blocks[keep:]

    def set_batch(self, seq_ids: list[int]) -> None:
        """Choose which sequences the next forward pass processes, one per input row."""
        for s in seq_ids:
            if s not in self.seqs:
                raise KeyError(f"sequence {s} not in the cache")
        self.batch = list(seq_ids)

    # ------------------------------------------------------------------------- sinks / eviction
    def _evict(self, seq: _Seq, num_new: int) -> None:
        """Drop the oldest non-sink blocks until ``num_new`` more tokens fit in the sink budget."""
        bs = self.block_size
        while seq.length + num_new > self.max_cached and len(seq.blocks) > self.sink_blocks + 1:
            victim = seq.blocks.pop(self.sink_blocks)
            self.allocator.free([victim])
            seq.length -= bs
            seq.evicted += bs
            # Keys after the victim move bs positions down: rotate them by -bs.
            start = self.sink_blocks * bs
            if seq.length > start:
                slots = self._slots(seq, start, seq.length)
                angle = -float(bs) * self.inv_freq
                emb = torch.cat((angle, angle))
                cos, sin = emb.cos().to(self.k.dtype), emb.sin().to(self.k.dtype)
                k = self.k[:, slots]  # [L, n, kv, hd]
                self.k[:, slots] = k * cos + rotate_half(k) * sin

    def _slots(self, seq: _Seq, start: int, end: int) -> Tensor:
        idx = torch.arange(start, end)
        blocks = torch.tensor(seq.blocks, dtype=torch.long)
        return blocks[idx // self.block_size - seq.dropped] * self.block_size + idx % self.block_size

    # ---------------------------------------------------------------------------- cache protocol
    def prepare(self, num_new: int, cfg: ModelConfig) -> AttnMeta:
        if not self.batch:
            raise RuntimeError("set_batch() must be called before a forward pass")
        bs = self.block_size
        starts: list[int] = []
        for sid in self.batch:
            seq = self.seqs[sid]
            if self.sinks is not None:
                if (
                    seq.length + num_new > self.max_cached
                    and num_new > self.max_cached - self.sink_blocks * bs - bs
                ):
                    raise LLMLabError(
                        f"{num_new} new tokens do not fit the attention-sink window; prefill in smaller chunks"
                    )
                self._evict(seq, num_new)
            elif self.window is not None:
                self._release_outside_window(seq)
            need = -(-(seq.length + num_new) // bs) - seq.dropped - len(seq.blocks)
            if need > self.allocator.num_free:
                raise CacheFullError(f"KV cache is full: sequence {sid} needs {need} more blocks")
            for _ in range(need):
                seq.blocks.append(self.allocator.allocate())
            starts.append(seq.length)
        ends = [s + num_new for s in starts]
        max_end = max(ends)
        B = len(self.batch)
        # Keys are gathered from the oldest block any row still holds (block 0 unless the window freed some).
        drops = [self.seqs[sid].dropped for sid in self.batch]
        first = min(drops)
        k0 = first * bs
        # Slot of every (row, position >= k0): new tokens to write, and all keys to gather (padding and
        # freed blocks -> slot 0, hidden by the mask).
        table = torch.zeros(B, -(-max_end // bs) - first, dtype=torch.long)
        for b, sid in enumerate(self.batch):
            blocks = self.seqs[sid].blocks
            off = drops[b] - first
            table[b, off : off + len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        pos = torch.arange(k0, max_end)
        gather = table[:, pos // bs - first] * bs + pos % bs  # [B, S]
        start_t = torch.tensor(starts)
        q_pos = start_t[:, None] + torch.arange(num_new)[None, :]  # [B, T]
        write = gather.gather(1, q_pos - k0)
        device = self.k.device
        self._pending = (write.to(device).reshape(-1), gather.to(device).reshape(-1), starts, num_new)
        window = cfg.sliding_window if self.sinks is None else None
        uniform = all(s == starts[0] for s in starts)
        q_pos = q_pos.to(device)
        if self.tree is not None:
            return self._tree_meta(q_pos, ends, k0)
        if k0 == 0 and uniform and num_new == 1 and (window is None or max_end <= window):
            return AttnMeta(q_pos=q_pos, mask=None, is_causal=False)
        if k0 == 0 and uniform and starts[0] == 0 and (window is None or max_end <= window):
            return AttnMeta(q_pos=q_pos, mask=None, is_causal=True)
        k_pos = torch.arange(k0, max_end, device=device)[None, :].expand(B, max_end - k0)
        k_valid = k_pos < torch.tensor(ends, device=device)[:, None]
        if first != max(drops):  # rows that freed more blocks than the oldest: hide their freed slots
            k_valid &= k_pos >= torch.tensor(drops, device=device)[:, None] * bs
        return AttnMeta(q_pos=q_pos, mask=build_mask(q_pos, k_pos, k_valid, window), is_causal=False)

    def _tree_meta(self, q_pos: Tensor, ends: list[int], k0: int) -> AttnMeta:
        """Attention for a candidate tree written in slots ``start..start+T-1`` (breadth-first order): node
        ``i`` sits at position ``start + depth[i]`` and sees the sequence's cached tokens and its ancestors."""
        depth, ancestors = self.tree
        self.tree = None
        if k0 != 0:
            raise LLMLabError("tree verification does not combine with a sliding window")
        device = q_pos.device
        T = q_pos.shape[1]
        start = q_pos[:, :1]  # [B, 1]
        k_pos = torch.arange(max(ends), device=device)[None, :]
        idx = k_pos - start  # [B, S]: the key's index in the tree, negative for cached tokens
        in_tree = (idx >= 0) & (idx < T)
        tree_ok = ancestors.to(device)[:, idx.clamp(0, T - 1)].permute(1, 0, 2)  # [B, T, S]
        mask = (idx < 0)[:, None, :] | (in_tree[:, None, :] & tree_ok)
        return AttnMeta(q_pos=start + depth.to(device)[None, :], mask=mask.unsqueeze(1), is_causal=False)

    def move(self, seq_id: int, src: list[int], dst: list[int]) -> None:
        """Copy the keys/values of the sequence's positions ``src`` to positions ``dst`` (every layer): the
        accepted path of a candidate tree moves to consecutive positions before the rest is truncated."""
        seq = self.seqs[seq_id]
        bs = self.block_size

        def slots(positions: list[int]) -> Tensor:
            return torch.tensor(
                [seq.blocks[p // bs - seq.dropped] * bs + p % bs for p in positions], device=self.k.device
            )

        s, d = slots(src), slots(dst)
        self.k[:, d] = self.k[:, s]
        self.v[:, d] = self.v[:, s]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        assert self._pending is not None, "prepare() must be called before update()"
        write, gather, starts, n = self._pending
        B, H, T, D = k.shape
        ck, cv = self.k[layer], self.v[layer]
        k = k.transpose(1, 2).reshape(B * T, H, D)
        v = v.transpose(1, 2).reshape(B * T, H, D)
        ck.index_copy_(0, write, k if k.dtype == ck.dtype else k.to(ck.dtype))
        cv.index_copy_(0, write, v if v.dtype == cv.dtype else v.to(cv.dtype))
        S = gather.numel() // B
        k_all = ck.index_select(0, gather).view(B, S, H, D).transpose(1, 2)
        v_all = cv.index_select(0, gather).view(B, S, H, D).transpose(1, 2)
        return k_all, v_all

    def advance(self, num_new: int) -> None:
        assert self._pending is not None
        _, _, starts, n = self._pending
        for sid, s in zip(self.batch, starts, strict=True):
            self.seqs[sid].length = s + n
        self._pending = None
