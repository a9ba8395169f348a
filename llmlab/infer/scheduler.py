"""Requests and the scheduler: admission, the decode batch, preemption, and recording generated tokens.

Requests wait in a FIFO queue. Each engine step asks :meth:`Scheduler.admit` which waiting requests to
prefill: while there is a free batch slot and the cache can hold a request's prompt (net of the blocks its
prefix-cache hits share), it is admitted and its cache sequence created. Every other running request
decodes; :meth:`Scheduler.make_room` checks the pool holds their next tokens and, when it does not, preempts
the most recently admitted ones: their blocks are freed and they go back to the front of the queue to be
recomputed later (vLLM's recompute preemption), so the engine never deadlocks.

:meth:`Scheduler.append_token` records one generated token and finishes the request on a stop token, a stop
string (found by the output processor, which owns text), ``max_tokens`` or the context length. A finished
or aborted request frees its blocks at once, and every ``on_free`` callback (the speculative decoder's draft
cache) is told.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable

import torch

from llmlab.infer.paged_cache import PagedKVCache
from llmlab.infer.sampling import SamplingParams


class Request:
    """Mutable state of one request inside the engine (created by the engine, read by its parts)."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        seq_id: int,
        stop_ids: set[int],
        stream: bool = True,
    ):
        self.id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.seq_id = seq_id  # this request's sequence in the KV cache
        # A seeded request draws from its own generator, so a seed gives the same tokens in any batch;
        # unseeded sampled requests share the runner's generator (None here).
        self.generator: torch.Generator | None = (
            torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        )
        # The tokenizer's stop ids (unless ignore_eos) plus the request's own.
        self.stop_ids = set(params.stop_token_ids or []) | (set() if params.ignore_eos else stop_ids)
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.text = ""  # decoded text (kept up to date only for requests with stop strings, then final)
        self.text_final = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at the last admission
        self.emitted_text = 0  # characters already returned as deltas
        self.emitted_tokens = 0
        self.stream = stream  # False for generate(): no text is decoded until the request finishes

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    """Owns the queue, the running batch and the cache's sequences (see the module docstring)."""

    def __init__(
        self,
        cache: PagedKVCache,
        max_batch_size: int,
        prefill_chunk: int,
        max_model_len: int | None,
        find_stop_string: Callable[[Request], str | None] | None = None,
    ):
        self.cache = cache
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.max_model_len = max_model_len
        self.find_stop_string = find_stop_string
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.on_free: list[Callable[[Request], None]] = []
        self._seq_ids = itertools.count()
        self.num_preemptions = 0
        self.prompt_tokens_total = 0  # prompt tokens of admitted requests (first admission only)
        self.generation_tokens_total = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # ... and found there

    # ------------------------------------------------------------------------------- requests
    def new_seq_id(self) -> int:
        return next(self._seq_ids)

    def add(self, req: Request) -> None:
        self.requests[req.id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        """Cancel a request: it leaves the queue or the batch and its blocks are freed now."""
        req = self.requests.get(request_id)
        if req is None or req.finish_reason is not None:
            return None
        del self.requests[request_id]
        if req in self.waiting:
            self.waiting.remove(req)
        req.finish_reason = "abort"
        if req in self.running:
            self.running.remove(req)
        self.free(req)
        return req

    def forget(self, req: Request) -> None:
        """Drop a finished request from the id table (once its last output was returned)."""
        self.requests.pop(req.id, None)

    # ------------------------------------------------------------------------------ scheduling
    def admit(self) -> list[Request]:
        """Waiting requests to prefill now, in order; their cache sequences exist (prefix hits attached)."""
        admitted: list[Request] = []
        budget = self.cache.num_free_blocks
        while self.waiting and len(self.running) < self.max_batch_size:
            req = self.waiting[0]
            tokens = self.prefill_tokens(req)
            need = self.cache.blocks_to_admit(tokens, 1, self.prefill_chunk)
            if need > budget:
                break
            budget -= need
            self.waiting.popleft()
            if not req.output_ids:
                self.prompt_tokens_total += len(req.prompt_ids)
            req.num_cached_tokens = self.cache.add_sequence(req.seq_id, tokens)
            if self.cache.prefix_caching:
                self.prefix_cache_queries += len(tokens)
                self.prefix_cache_hits += req.num_cached_tokens
            self.running.append(req)
            admitted.append(req)
        return admitted

    @staticmethod
    def prefill_tokens(req: Request) -> list[int]:
        """What a prefill runs: the prompt, or after a preemption, also all but the newest generated token
        (which is the next decode input)."""
        return req.prompt_ids + req.output_ids[:-1] if req.output_ids else req.prompt_ids

    def make_room(self, reqs: list[Request], num_new: int = 1) -> list[Request]:
        """Preempt the newest of ``reqs`` until the pool holds ``num_new`` more tokens for each of the rest;
        returns the requests that still run. A request alone that still does not fit is finished
        (``"length"``): the pool is too small for it."""
        reqs = list(reqs)
        while reqs:
            need = sum(self.cache.blocks_needed(r.seq_id, num_new) for r in reqs)
            if need <= self.cache.num_free_blocks:
                break
            victim = reqs.pop()
            if not reqs:
                self.finish(victim, "length")
                return []
            self.preempt(victim)
        return reqs

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.free(req)
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def fits(self, reqs: list[Request], num_new: int) -> bool:
        """Whether the pool holds ``num_new`` more tokens for every one of ``reqs`` without preempting."""
        return sum(self.cache.blocks_needed(r.seq_id, num_new) for r in reqs) <= self.cache.num_free_blocks

    # ----------------------------------------------------------------------------- generated tokens
    def append_token(
        self,
        req: Request,
        token: int,
        logprob: float | None = None,
        top_logprobs: dict[int, float] | None = None,
    ) -> bool:
        """Record one generated token; finish the request if it ends here. Returns whether it finished."""
        req.output_ids.append(token)
        self.generation_tokens_total += 1
        if logprob is not None:
            req.logprobs.append(logprob)
        if top_logprobs is not None:
            req.top_logprobs.append(top_logprobs)
        if token in req.stop_ids:
            req.stop_reason = token
            self.finish(req, "stop")
            return True
        if req.params.stop_strings and self.find_stop_string is not None:
            stop = self.find_stop_string(req)
            if stop is not None:
                req.stop_reason = stop
                self.finish(req, "stop")
                return True
        if len(req.output_ids) >= req.params.max_tokens or (
            self.max_model_len is not None and req.num_tokens >= self.max_model_len
        ):
            self.finish(req, "length")
            return True
        return False

    def finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        self.free(req)

    def free(self, req: Request) -> None:
        """Return a request's cache blocks (with prefix caching, its full blocks stay cached for reuse)."""
        if self.cache.prefix_caching and req.seq_id in self.cache.seqs:
            self.cache.cache_full_blocks(req.seq_id, req.all_token_ids)
        self.cache.free_sequence(req.seq_id)
        for callback in self.on_free:
            callback(req)

    def cache_computed_blocks(self, reqs: list[Request]) -> None:
        """Register the full blocks these requests have computed so far in the prefix cache."""
        if self.cache.prefix_caching:
            for r in reqs:
                if r.seq_id in self.cache.seqs:
                    self.cache.cache_full_blocks(r.seq_id, r.all_token_ids)
