"""Medusa heads inside the engine: what each request keeps between steps, and one LM-head read per step.

Head ``k`` drafts from the target's hidden state under a request's newest token, i.e. at the verify
position ``n`` of the last accepted token -- known only after the verify forward's logits have been read.
Computing the heads' logits then, or at the next step, reads the ``[V, D]`` LM head a second time (113 MB
in fp32 for SmolLM2: a fifth of a decode step's weight traffic). Instead, as the Medusa reference code
does, the verify forward runs the heads' residual blocks on its hidden rows *before* the LM head, and the
heads' rows go through the **same** ``F.linear`` as the target's own (:meth:`MedusaState.extra_rows` for
``ModelRunner.forward(extra_rows=...)``); the accepted position's rows are kept as the next drafts' logits.

That matmul grows by ``num_heads`` rows per fused position, which is free while the product is bound by
reading the weight (a few dozen rows on a CPU) and not once it is bound by compute (large batches, big
trees). So only ``max_rows // (batch * num_heads)`` verify positions are fused -- the likeliest
last-accepted ones: position 0 (nothing accepted), then the first drafts or tree nodes -- and a request
whose accepted position lies past them keeps its hidden state, whose heads run at the next step through a
separate (batched) LM-head read, as before. ``max_rows=0`` turns fusion off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from llmlab.infer.runner import ModelRunner
from llmlab.infer.scheduler import Request
from llmlab.medusa.heads import MedusaHeads

# Extra LM-head rows one verify forward may carry for the heads (see the module docstring). Measured on a
# 2-core CPU (bench/medusa.py, "step cost"): the SmolLM2 LM-head matmul over 25 rows took 24 ms against
# 18 + 16.5 ms for separate reads of 5 and 4 rows; at 48 rows (38 ms) fusing no longer gains.
FUSE_MAX_ROWS = 40


@dataclass
class _Kept:
    count: int  # the request's token count when kept: valid while it has not changed
    logits: Tensor | None  # [num, V] float32: the heads' logits (fused), or None
    hidden: Tensor | None  # [D]: the hidden state (when its position was not fused)


class MedusaState:
    """Per-request Medusa state for a speculative decoder: kept head logits or hidden states."""

    def __init__(self, heads: MedusaHeads, runner: ModelRunner, num: int, max_rows: int = FUSE_MAX_ROWS):
        self.heads = heads
        self.runner = runner
        self.num = min(num, heads.num_heads)  # heads the next step can use (chain length / tree depth)
        self.max_rows = max_rows
        self._kept: dict[str, _Kept] = {}
        self._fused: dict[int, int] = {}  # verify position -> its index among the fused ones (this step)
        self.stats = {"fused": 0, "unfused": 0}  # kept states with / without their heads' logits

    def drop(self, req_id: str) -> None:
        self._kept.pop(req_id, None)

    def ready(self, req: Request, tokens: list[int]) -> bool:
        """Whether the heads can draft for ``req``: what it keeps is from under its newest token."""
        kept = self._kept.get(req.id)
        return kept is not None and kept.count == len(tokens)

    def extra_rows(self, batch: int, order: list[int]) -> Callable[[Tensor], Tensor] | None:
        """The ``extra_rows`` callable of a verify forward over ``batch`` rows: the heads' states
        ``[batch * p * num, D]`` at the first ``p`` verify positions of ``order`` (likeliest last-accepted
        first), as many as ``max_rows`` allows; None: no fusion this step."""
        p = min(len(order), self.max_rows // max(1, batch * self.num))
        if self.heads.proj is not None:  # the heads' own projections: nothing to share with the target
            p = 0
        self._fused = {pos: i for i, pos in enumerate(order[:p])}
        if p == 0:
            return None
        index = torch.tensor(order[:p])

        def rows(hidden: Tensor) -> Tensor:  # hidden [B, T, D] -> [B * p * num, D]
            dtype = next(self.heads.parameters()).dtype
            picked = hidden[:, index.to(hidden.device)].to(dtype)
            states = self.heads.states(picked, self.num).to(hidden.dtype)
            return states.reshape(-1, states.shape[-1])

        return rows

    def keep(self, req: Request, row: int, pos: int, hidden: Tensor, extra: Tensor | None) -> None:
        """After verification: ``req`` (batch ``row``) ends on verify position ``pos``; ``hidden [B, T, D]``
        and ``extra`` (the fused rows' logits ``[B * p * num, V]``, or None) are the forward's."""
        count = len(req.all_token_ids)
        if extra is not None and pos in self._fused:
            p, num = len(self._fused), self.num
            logits = extra.view(-1, p, num, extra.shape[-1])[row, self._fused[pos]].clone()
            self._kept[req.id] = _Kept(count, logits, None)
            self.stats["fused"] += 1
        else:
            self._kept[req.id] = _Kept(count, None, hidden[row, pos].clone())
            self.stats["unfused"] += 1

    def logits(self, reqs: list[Request], num: int) -> Tensor:
        """The first ``num`` heads' logits ``[len(reqs), num, V]`` for requests that are :meth:`ready`: the
        kept fused rows, or the heads over the kept hidden states (one batched LM-head read for those)."""
        kept = [self._kept[r.id] for r in reqs]
        missing = [i for i, k in enumerate(kept) if k.logits is None]
        out: list[Tensor | None] = [k.logits[:num] if k.logits is not None else None for k in kept]
        if missing:
            h = torch.stack([kept[i].hidden for i in missing])
            for i, row in zip(missing, self.head_logits(h, num), strict=True):
                out[i] = row
        return torch.stack(out)

    def head_logits(self, hidden: Tensor, num: int) -> Tensor:
        """The first ``num`` heads' logits ``[N, num, V]`` over ``hidden [N, D]`` (its own LM-head read)."""
        heads = self.heads
        with torch.inference_mode():
            states = heads.states(hidden.to(next(heads.parameters()).dtype), num).to(hidden.dtype)
            if heads.proj is None:
                return self.runner.head_logits(states)
            return torch.stack([p(states[:, j]) for j, p in zip(range(num), heads.proj)], 1).float()
