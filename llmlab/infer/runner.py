"""The model runner: forward passes over the paged cache (the fused fast path when it applies) and sampling.

The runner knows nothing about queues: it is handed requests and returns logits or sampled tokens.

- :meth:`ModelRunner.forward` runs ids continuing cache sequences (in eval mode, restoring a training
  policy's mode afterwards), through :mod:`llmlab.infer.fast` where the model allows it;
- :meth:`ModelRunner.prefill` runs a request's prompt in chunks of ``prefill_chunk``, skipping the tokens
  the prefix cache already holds;
- :meth:`ModelRunner.sample` picks each row's next token: one ``argmax`` for a plain greedy batch, else per
  request the logits processors, penalties, temperature and filters of :mod:`llmlab.infer.sampling`, and
  the chosen token's log-probability (and the top alternatives) when asked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmlab.infer.paged_cache import PagedKVCache
from llmlab.infer.sampling import chosen_logprob, process_logits, sample_from, top_logprobs
from llmlab.infer.scheduler import Request


@dataclass
class SampledToken:
    token: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


class ModelRunner:
    """Runs one model over one paged cache (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        cache: PagedKVCache,
        prefill_chunk: int,
        fast: object | None = None,
        seed: int = 0,
    ):
        self.model = model
        self.cache = cache
        self.prefill_chunk = prefill_chunk
        self.fast = fast  # a FastDecoder, or None: the model's own forward
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.generator = torch.Generator().manual_seed(seed)  # for unseeded sampled requests
        self.prefill_tokens = 0  # tokens run through prefill forwards (prefix-cache hits excluded)
        self.decode_tokens = 0

    # ------------------------------------------------------------------------------- forward
    def new_batch(self) -> None:
        """Work starts after an idle spell: check the fast path's weights against the model again."""
        if self.fast is not None:
            self.fast.recheck()

    def forward(
        self,
        ids: Tensor,
        seq_ids: list[int],
        last_only: bool = True,
        with_hidden: bool = False,
        extra_rows: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """Logits ``[B, V]`` of the last position (or ``[B, T, V]``) for ``ids`` continuing ``seq_ids``;
        ``with_hidden``: ``(logits, final-norm hidden states)`` (Medusa heads read them). ``extra_rows``
        maps the hidden states to more rows ``[R, D]`` that go through the same LM-head matmul (the
        weight is read once); then ``(logits, hidden, their logits [R, V])``."""
        self.cache.set_batch(seq_ids)
        training = self.model.training
        if training:  # e.g. an RL policy between updates: generate without dropout, then restore
            self.model.eval()
        try:
            return self._forward(ids, last_only, with_hidden, extra_rows)
        finally:
            if training:
                self.model.train()

    def _forward(
        self, ids: Tensor, last_only: bool, with_hidden: bool = False, extra_rows: Callable | None = None
    ) -> Tensor | tuple[Tensor, ...]:
        with torch.inference_mode():
            if self.fast is not None and self.fast.usable(self.model):
                hidden = self.fast.forward(ids, self.cache)
                head = self.fast.logits
            else:
                hidden = self.model(ids, cache=self.cache, return_hidden=True)
                head = self.model.logits
            if last_only:
                hidden = hidden[:, -1]
            if extra_rows is not None:  # one LM-head read for the target's rows and the extra ones
                rows = hidden.reshape(-1, hidden.shape[-1])
                out = head(torch.cat([rows, extra_rows(hidden)])).float()
                return out[: len(rows)].view(*hidden.shape[:-1], -1), hidden, out[len(rows) :]
            logits = head(hidden).float()
            return (logits, hidden) if with_hidden else logits

    def head_logits(self, hidden: Tensor) -> Tensor:
        """The target's LM head (the fast path's weights when it runs) over ``hidden``: float32 logits."""
        with torch.inference_mode():
            fast = self.fast is not None and self.fast.usable(self.model)
            return (self.fast.logits if fast else self.model.logits)(hidden).float()

    def prefill(self, req: Request, tokens: list[int]) -> Tensor:
        """Run ``tokens`` past the ones the cache already holds for ``req``; last-position logits ``[1, V]``."""
        start = self.cache.length(req.seq_id)
        logits = None
        for begin in range(start, len(tokens), self.prefill_chunk):
            chunk = torch.tensor([tokens[begin : begin + self.prefill_chunk]], device=self.device)
            logits = self.forward(chunk, [req.seq_id], last_only=True)
        self.prefill_tokens += len(tokens) - start
        assert logits is not None, "the prefix cache always leaves one token to compute"
        return logits

    def decode(self, reqs: list[Request]) -> Tensor:
        """One batched decode forward: each request's newest token; logits ``[B, V]``."""
        ids = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.device)
        self.decode_tokens += len(reqs)
        return self.forward(ids, [r.seq_id for r in reqs], last_only=True)

    # ------------------------------------------------------------------------------ sampling
    def generator_for(self, req: Request) -> torch.Generator | None:
        """A seeded request's own generator, the runner's shared one for other sampled requests."""
        if req.generator is not None:
            return req.generator
        return None if req.params.greedy else self.generator

    def sample(self, logits: Tensor, reqs: list[Request]) -> list[SampledToken]:
        """Next token of each row of ``logits [B, V]`` (row ``b`` belongs to ``reqs[b]``)."""
        if all(_plain_greedy(r) for r in reqs):
            return [SampledToken(t) for t in logits.argmax(dim=-1).tolist()]
        out = []
        for row, req in enumerate(reqs):
            out.append(self.sample_row(logits[row], req, req.output_ids))
        return out

    def sample_row(self, raw: Tensor, req: Request, history: list[int]) -> SampledToken:
        """Sample from one raw logits row given the generated ``history`` (speculative verification scores
        drafts past ``req.output_ids``)."""
        p = req.params
        processed = process_logits(raw, p, req.prompt_ids, history)
        token = sample_from(processed, p, self.generator_for(req))
        return SampledToken(token, *score(raw, processed, token, req))


def score(raw: Tensor, processed: Tensor, token: int, req: Request) -> tuple[float | None, dict | None]:
    """``(logprob, top_logprobs)`` of ``token`` as the request asked for them (None when not)."""
    p = req.params
    lp = chosen_logprob(raw, processed, token, p) if p.wants_logprobs else None
    top = top_logprobs(raw, processed, p.top_logprobs, p) if p.top_logprobs > 0 else None
    return lp, top


def _plain_greedy(req: Request) -> bool:
    p = req.params
    return p.greedy and not p.needs_history and not p.wants_logprobs and not p.logits_processors
