"""The generation engine: ``LLM`` with a continuous-batching scheduler over a paged KV cache.

One engine serves every stage that generates (RL rollouts, evaluation, chat, the server)::

    llm = LLM("ckpt/")                              # or LLM.from_model(model, tokenizer)
    outs = llm.generate(["Once upon a time"], SamplingParams(temperature=0.8, max_tokens=64))
    for delta in llm.stream("Hi", SamplingParams()):  # text deltas as they are generated
        print(delta.delta_text, end="")

**Scheduling.** Requests wait in a FIFO queue. Each :meth:`LLM.step` first admits waiting requests while
there is a free batch slot and enough free cache blocks and *prefills* each one (its prompt in chunks,
sampling its first token), then runs one *batched decode* step over every other running request. Requests
join and leave between steps; a finished or aborted request frees its blocks at once. When the pool runs out
in the middle of decoding, the most recently admitted request is *preempted*: its blocks are freed and it
goes back to the front of the queue to be recomputed later (vLLM's recompute preemption), so the engine never
deadlocks.

**Errors.** :meth:`LLM.generate` validates every request before doing any work and raises one
:class:`LLMLabError` naming the bad prompt. :meth:`LLM.add_request` (the server's path) raises for the bad
request only; requests already queued keep running.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.errors import LLMLabError
from llmlab.infer.paged_cache import PagedKVCache
from llmlab.infer.sampling import (
    SamplingParams,
    chosen_logprob,
    find_stop,
    process_logits,
    sample_from,
    stop_prefix_len,
)

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


@dataclass
class RequestOutput:
    """One request's result (or, while streaming, its state so far plus the newest ``delta_*``).

    ``token_ids`` holds every generated token, a final stop token included; ``text`` is their decoded text
    without the stop token or stop string. ``finish_reason`` is ``"stop"``, ``"length"``, ``"abort"`` or
    ``None`` while still running; ``stop_reason`` is the stop token id or stop string that ended it.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] | None = None
    stop_reason: int | str | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Request:
    """Mutable state of one request inside the engine."""

    def __init__(
        self, rid: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams, engine: LLM
    ):
        self.id = rid
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        elif not params.greedy:
            self.generator = engine._generator
        stops = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            stops |= set(engine.stop_ids)
        self.stop_ids = stops
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.seq_id = next(engine._seq_counter)
        self.emitted_text = 0  # characters already returned as deltas
        self.emitted_tokens = 0
        self.stream = True  # False for generate(): no text is decoded until the request finishes

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class LLM:
    """Generation engine over one :class:`~llmlab.model.Transformer` (see the module docstring).

    Options: ``max_batch_size`` (running requests at once), ``block_size`` and ``kv_cache_mb`` (paged cache
    pool; ``num_blocks`` overrides the size), ``max_model_len`` (context; defaults to the model's, times the
    RoPE scaling factor), ``rope_scaling`` (dict or :class:`RopeScaling`: run past the trained context),
    ``sliding_window`` (blocks the window has passed are freed, so memory is bounded by the window),
    ``attention_sinks=(S, W)`` (StreamingLLM: bounded memory, unbounded length),
    ``prefill_chunk`` (tokens per prefill forward), ``dtype``, ``seed`` (for unseeded sampled requests),
    ``fast`` (fused decode path, on by default where the model allows it; ``fast="int8"``/``"int4"`` also
    store its matmul weights quantized -- faster batch-1 decode, no longer bit-exact), ``speculative``
    (``"ngram"`` or ``{"method": "draft", "draft_model": ..., "num_tokens": 4}``; see
    :mod:`llmlab.infer.speculative`).

    The engine is not thread-safe: drive ``add_request``/``step``/``abort`` from one thread (a server runs
    them in one loop and hands results to its connections).
    """

    def __init__(self, path: str | Path | None = None, tokenizer: Any = None, **options: Any):
        if path is None:
            raise LLMLabError("LLM() needs a model path (or use LLM.from_model(model, tokenizer))")
        _check_options(options, extra=("adapter",))
        model, loaded_tok = _load(path, options.pop("adapter", None))
        self._setup(model, tokenizer or loaded_tok, **options)
        self._borrowed_model = False

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any = None, **options: Any) -> LLM:
        """Wrap an in-memory model (e.g. the policy during RL). The engine reads its live weights: training
        the model between calls is seen by the next ``generate``. ``rope_scaling``/``sliding_window``
        options change the model's config in place."""
        _check_options(options)
        self = cls.__new__(cls)
        self._setup(model, tokenizer, **options)
        self._borrowed_model = True
        return self

    def _setup(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_mb: float = 256.0,
        max_model_len: int | None = None,
        rope_scaling: Any = None,
        sliding_window: int | None = None,
        attention_sinks: tuple[int, int] | None = None,
        prefill_chunk: int = 512,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        fast: bool | str = True,
        speculative: Any = None,
    ) -> None:
        from llmlab.model.transformer import Transformer

        if not isinstance(model, Transformer):
            raise LLMLabError(f"LLM needs an llmlab Transformer, got {type(model).__name__}")
        if dtype is not None:
            model = model.to(_dtype(dtype))
        self.model = model  # left in its mode: forward() runs it in eval mode and restores training mode
        self.tokenizer = tokenizer
        cfg = model.cfg
        if rope_scaling is not None:
            cfg = _apply_rope_scaling(model, rope_scaling)
            if max_model_len is None:
                original = cfg.rope_scaling.original_max_seq_len or cfg.max_seq_len
                max_model_len = int(original * cfg.rope_scaling.factor)
        if sliding_window is not None:
            if sliding_window <= 0:
                raise LLMLabError(f"option 'sliding_window' must be positive, got {sliding_window}")
            model.cfg = cfg = dataclasses.replace(cfg, sliding_window=sliding_window)
        self.cfg = cfg
        self.attention_sinks = tuple(attention_sinks) if attention_sinks is not None else None
        if self.attention_sinks is not None:
            self.max_model_len = None  # memory stays bounded: no length limit
            prefill_chunk = min(prefill_chunk, self.attention_sinks[1])
        else:
            self.max_model_len = max_model_len or cfg.max_seq_len
            if cfg.position == "learned" and self.max_model_len > cfg.max_seq_len:
                raise LLMLabError(f"'max_model_len' {self.max_model_len} is past the learned position table")
        if max_batch_size <= 0 or prefill_chunk <= 0:
            raise LLMLabError("options 'max_batch_size' and 'prefill_chunk' must be positive")
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if num_blocks is None:
            per_block = PagedKVCache.bytes_per_token(cfg, self.dtype) * block_size
            want_len = self.max_model_len or (sum(self.attention_sinks) + 2 * block_size)
            if self.attention_sinks is None and cfg.sliding_window is not None:  # the cache frees the rest
                want_len = min(want_len, cfg.sliding_window + prefill_chunk + 2 * block_size)
            wanted = max_batch_size * -(-want_len // block_size) + 1
            num_blocks = max(1, min(wanted, int(kv_cache_mb * 2**20) // per_block))
        inv_freq = model.rotary.inv_freq if getattr(model, "rotary", None) is not None else None
        self.cache = PagedKVCache(
            cfg,
            num_blocks,
            block_size,
            self.dtype,
            self.device,
            sinks=self.attention_sinks,
            rope_inv_freq=inv_freq,
        )
        self.stop_ids: list[int] = list(getattr(tokenizer, "stop_ids", []) or [])
        self._generator = torch.Generator().manual_seed(seed)
        self._seq_counter = itertools.count()
        self._req_counter = itertools.count()
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.requests: dict[str, _Request] = {}
        self.fast = None
        if fast:
            from llmlab.infer.fast import FastDecoder

            self.fast = FastDecoder.create(model, fast if isinstance(fast, str) else "same")
        self.speculative = None
        if speculative is not None:
            from llmlab.infer.speculative import SpeculativeDecoder

            self.speculative = SpeculativeDecoder.create(self, speculative)
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0}

    # -------------------------------------------------------------------------------- prompts
    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def encode_prompt(
        self, prompt: Prompt, add_generation_prompt: bool = True
    ) -> tuple[str | None, list[int]]:
        """Prompt -> (text or None, token ids): a string, a list of token ids, or a chat message list."""
        if isinstance(prompt, str):
            return prompt, self._tok().encode(prompt)
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            from llmlab.infer.chat import encode_chat

            # Message content is plain text: a literal "<|im_end|>" in it must not become the control token.
            return encode_chat(self._tok(), list(prompt), add_generation_prompt=add_generation_prompt)
        if isinstance(prompt, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise LLMLabError(
                    f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})"
                )
            return None, ids
        raise LLMLabError("a prompt must be a string, a list of token ids, or a list of chat messages")

    def _tok(self) -> Any:
        if self.tokenizer is None:
            raise LLMLabError("this engine has no tokenizer: pass token-id prompts, or a tokenizer")
        return self.tokenizer

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise LLMLabError(f"expected SamplingParams, got {type(params).__name__}")
        params.validate(self.vocab_size)
        if params.stop_strings and self.tokenizer is None:
            raise LLMLabError("stop strings need a tokenizer")
        if not prompt_ids:
            raise LLMLabError("empty prompt")
        if self.max_model_len is not None and len(prompt_ids) >= self.max_model_len:
            raise LLMLabError(
                f"prompt has {len(prompt_ids)} tokens; the context is {self.max_model_len} "
                "(it must leave room for at least one new token)"
            )
        if self.cache.blocks_needed(None, len(prompt_ids) + 1, self.prefill_chunk) > self.cache.num_blocks:
            raise LLMLabError(
                f"prompt has {len(prompt_ids)} tokens; the KV cache holds only "
                f"{self.cache.num_blocks * self.cache.block_size} (raise 'kv_cache_mb')"
            )

    # ---------------------------------------------------------------------------- request API
    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue one request; returns its id. A bad request raises :class:`LLMLabError` and queues nothing."""
        params = params or SamplingParams()
        text, ids = self.encode_prompt(prompt)
        self._check(ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._req_counter)}"
        if rid in self.requests:
            raise LLMLabError(f"request id {rid!r} is already in use")
        req = _Request(rid, text, ids, params, self)
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        """Cancel a request: it leaves the queue or the batch and its cache blocks are freed."""
        req = self.requests.get(request_id)
        if req is None or req.finish_reason is not None:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        self._free(req)
        req.finish_reason = "abort"
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[RequestOutput]:
        """One scheduler iteration: prefill newly admitted requests, then one batched decode step.

        Returns a snapshot (with deltas) of every request that produced a token this step.
        """
        touched: list[_Request] = []
        if not self.running and self.fast is not None and self._borrowed_model:
            # A borrowed model (from_model) may have been trained since the last batch. Fused optimizers
            # update parameters without bumping their version counters, so the fast path's cheap staleness
            # check cannot see it: re-fuse the weights whenever a new batch of work starts.
            self.fast.invalidate()
        prefilled = self._admit(touched)
        decoding = [r for r in self.running if r not in prefilled]
        if decoding and not (self.speculative and self.speculative.decode_step(decoding, touched)):
            self._decode(decoding, touched)
        outs = []
        for req in touched:
            outs.append(self._snapshot(req))
            if req.finish_reason is not None:
                self.requests.pop(req.id, None)
        return outs

    # ------------------------------------------------------------------------------ scheduler
    def _admit(self, touched: list[_Request]) -> list[_Request]:
        admitted = []
        while self.waiting and len(self.running) < self.max_batch_size:
            req = self.waiting[0]
            need = self.cache.blocks_needed(None, req.num_tokens + 1, self.prefill_chunk)
            if need > self.cache.num_free_blocks:
                break
            self.waiting.popleft()
            self._prefill(req)
            admitted.append(req)
            if req.finish_reason is None:
                self.running.append(req)
            if req.output_ids and len(req.output_ids) > req.emitted_tokens:
                touched.append(req)
        return admitted

    def _prefill(self, req: _Request) -> None:
        """Run the prompt (plus, after a preemption, all but the last generated token) through the model."""
        self.cache.add_sequence(req.seq_id)
        tokens = req.prompt_ids + req.output_ids[:-1] if req.output_ids else req.prompt_ids
        hidden = None
        for start in range(0, len(tokens), self.prefill_chunk):
            chunk = torch.tensor([tokens[start : start + self.prefill_chunk]], device=self.device)
            hidden = self.forward(chunk, [req.seq_id], last_only=True)
        self.stats["prefill_tokens"] += len(tokens)
        if not req.output_ids:  # a resumed request already has its next input token
            assert hidden is not None
            self._sample_rows(hidden, [req])

    def _decode(self, reqs: list[_Request], touched: list[_Request]) -> None:
        # Every running sequence needs room for one more token; preempt the newest ones until it fits.
        while True:
            need = sum(self.cache.blocks_needed(r.seq_id, 1) for r in reqs)
            if need <= self.cache.num_free_blocks:
                break
            victim = reqs.pop()
            if not reqs:  # alone and still no room: the pool is too small for this request
                self._finish(victim, "length")
                touched.append(victim)
                return
            self.running.remove(victim)
            self._free(victim)
            self.waiting.appendleft(victim)
            self.stats["preemptions"] += 1
        ids = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.device)
        logits = self.forward(ids, [r.seq_id for r in reqs], last_only=True)
        self.stats["decode_tokens"] += len(reqs)
        self._sample_rows(logits, reqs)
        touched.extend(reqs)

    def forward(self, ids: Tensor, seq_ids: list[int], last_only: bool = True) -> Tensor:
        """Logits ``[B, V]`` of the last position (or ``[B, T, V]``) for ``ids`` continuing ``seq_ids``."""
        self.cache.set_batch(seq_ids)
        training = self.model.training
        if training:  # e.g. an RL policy between updates: generate without dropout, then restore
            self.model.eval()
        try:
            return self._forward(ids, last_only)
        finally:
            if training:
                self.model.train()

    def _forward(self, ids: Tensor, last_only: bool) -> Tensor:
        with torch.inference_mode():
            if self.fast is not None and self.fast.usable(self.model):
                hidden = self.fast.forward(ids, self.cache)
                head = self.fast.logits
            else:
                hidden = self.model(ids, cache=self.cache, return_hidden=True)
                head = self.model.logits
            if last_only:
                hidden = hidden[:, -1]
            return head(hidden).float()

    def _sample_rows(self, logits: Tensor, reqs: list[_Request]) -> None:
        """Pick the next token of each row and append it to its request."""
        simple = all(r.params.greedy and not r.params.needs_history and not r.params.logprobs for r in reqs)
        if simple:
            for req, tok in zip(reqs, logits.argmax(dim=-1).tolist(), strict=True):
                self._append(req, tok, None)
            return
        for row, req in enumerate(reqs):
            p = req.params
            processed = process_logits(logits[row], p, req.prompt_ids, req.output_ids)
            tok = sample_from(processed, p, req.generator)
            lp = chosen_logprob(logits[row], processed, tok, p) if p.logprobs else None
            self._append(req, tok, lp)

    def _append(self, req: _Request, token: int, logprob: float | None) -> None:
        """Record one generated token and decide whether the request is finished."""
        req.output_ids.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
        p = req.params
        if token in req.stop_ids:
            req.stop_reason = token
            self._finish(req, "stop")
            return
        if p.stop_strings:
            before = len(req.text)
            req.text = self._decode_text(req, req.output_ids)
            i = find_stop(req.text, p.stop_strings, before)
            if i != -1:
                stop = next(s for s in p.stop_strings if req.text.startswith(s, i))
                req.text = req.text[:i]
                req.stop_reason = stop
                self._finish(req, "stop", decode=False)
                return
        if len(req.output_ids) >= p.max_tokens or (
            self.max_model_len is not None and req.num_tokens >= self.max_model_len
        ):
            self._finish(req, "length")

    def _decode_text(self, req: _Request, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)

    def _finish(self, req: _Request, reason: str, decode: bool = True) -> None:
        req.finish_reason = reason
        if decode:
            ids = (
                req.output_ids[:-1]
                if reason == "stop" and isinstance(req.stop_reason, int)
                else req.output_ids
            )
            req.text = self._decode_text(req, ids)
        if req in self.running:
            self.running.remove(req)
        self._free(req)

    def _free(self, req: _Request) -> None:
        """Return a request's cache blocks (and its speculative draft's) to their pools."""
        self.cache.free_sequence(req.seq_id)
        if self.speculative is not None:
            self.speculative.release(req)

    def _snapshot(self, req: _Request) -> RequestOutput:
        """Current output of ``req`` with the text/tokens that are new since the last snapshot.

        While running, text that may still become part of a stop string, or an incomplete UTF-8 character,
        is held back so a stream never shows something the final text will not contain.
        """
        if req.finish_reason is None and not req.stream:
            text, visible = "", 0
        elif req.finish_reason is None:
            text = req.text if req.params.stop_strings else self._decode_text(req, req.output_ids)
            visible = len(text) - stop_prefix_len(text, req.params.stop_strings)
            while visible > 0 and text[visible - 1] == "\ufffd":
                visible -= 1
        else:
            text, visible = req.text, len(req.text)
        delta_text = text[req.emitted_text : visible] if visible > req.emitted_text else ""
        req.emitted_text = max(req.emitted_text, visible)
        delta_ids = req.output_ids[req.emitted_tokens :]
        req.emitted_tokens = len(req.output_ids)
        return RequestOutput(
            request_id=req.id,
            prompt=req.prompt,
            prompt_token_ids=list(req.prompt_ids),
            text=text[:visible] if req.finish_reason is None else text,
            token_ids=list(req.output_ids),
            finish_reason=req.finish_reason,
            logprobs=list(req.logprobs) if req.params.logprobs else None,
            stop_reason=req.stop_reason,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
        )

    # ------------------------------------------------------------------------------ front door
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (continuous batching); outputs come back in prompt order.

        All requests are validated first: one bad prompt or parameter raises :class:`LLMLabError` naming it,
        before any work is done.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], (int, dict))
        ):
            prompts = [prompts]  # a single prompt
        prompts = list(prompts)
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise LLMLabError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        encoded = []
        for i, (prompt, p) in enumerate(zip(prompts, plist, strict=True)):
            try:
                text, ids = self.encode_prompt(prompt)
                self._check(ids, p)
            except LLMLabError as exc:
                raise LLMLabError(f"prompt {i}: {exc}") from exc
            encoded.append((text, ids, p))
        rids = []
        for text, ids, p in encoded:
            rid = f"gen-{next(self._req_counter)}"
            req = _Request(rid, text, ids, p, self)
            req.stream = False
            self.requests[rid] = req
            self.waiting.append(req)
            rids.append(rid)
        pending = set(rids)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(rids), desc="generate", unit="req")
        try:
            while pending:
                for out in self.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(tok=self.stats["decode_tokens"])
        except BaseException:
            for rid in pending:
                self.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in rids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield snapshots of one request as tokens arrive (``delta_text`` / ``delta_token_ids`` are new).

        Other queued requests keep being served while it runs. Closing the iterator early cancels it.
        """
        rid = self.add_request(prompt, params)
        done = False
        try:
            while not done:
                for out in self.step():
                    if out.request_id == rid:
                        done = out.finished
                        if out.delta_text or out.delta_token_ids or done:
                            yield out
        finally:
            if not done:
                self.abort(rid)

    # ---------------------------------------------------------------------------------- report
    def memory_report(self) -> dict[str, float]:
        """KV-cache cost per token by formula (``2*layers*kv_heads*head_dim*bytes``) and as allocated."""
        cfg, cache = self.cfg, self.cache
        formula = PagedKVCache.bytes_per_token(cfg, self.dtype)
        slots = cache.num_blocks * cache.block_size
        measured = cache.nbytes() / slots
        return {
            "kv_bytes_per_token": formula,
            "kv_bytes_per_token_measured": measured,
            "kv_pool_bytes": cache.nbytes(),
            "kv_pool_tokens": slots,
            "layers": cfg.n_layers,
            "kv_heads": cfg.kv_heads,
            "head_dim": cfg.dim_head,
        }


# ------------------------------------------------------------------------------------- helpers
def _check_options(options: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
    import inspect

    known = [n for n in inspect.signature(LLM._setup).parameters if n not in ("self", "model", "tokenizer")]
    for name in options:
        if name not in known and name not in extra:
            raise LLMLabError(f"unknown LLM option {name!r} (known: {', '.join(sorted([*known, *extra]))})")


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if name not in table:
        raise LLMLabError(f"option 'dtype' must be one of {sorted(table)}, got {name!r}")
    return table[name]


def _apply_rope_scaling(model: nn.Module, rope_scaling: Any):
    """Replace the model's RoPE scaling (config and cos/sin tables) in place; returns the new config."""
    from llmlab.config import from_dict
    from llmlab.errors import ConfigError
    from llmlab.model.config import RopeScaling
    from llmlab.model.rope import RotaryEmbedding

    cfg = model.cfg
    if cfg.position != "rope":
        raise LLMLabError("option 'rope_scaling' needs a RoPE model")
    if isinstance(rope_scaling, dict):
        try:
            rs = from_dict(RopeScaling, dict(rope_scaling))
        except ConfigError as exc:
            raise ConfigError(f"option 'rope_scaling': {exc}") from exc
    else:
        rs = rope_scaling
    if rs.original_max_seq_len is None:
        rs = dataclasses.replace(rs, original_max_seq_len=cfg.max_seq_len)
    rs.validate()
    new_cfg = dataclasses.replace(cfg, rope_scaling=rs)
    model.cfg = new_cfg
    model.rotary = RotaryEmbedding(new_cfg).to(next(model.parameters()).device)
    return new_cfg


def _load(path: str | Path, adapter: str | None = None):
    """Load ``(model, tokenizer)`` through ``llmlab.load`` (any format), or llmlab's own checkpoint loader."""
    try:
        from llmlab.loading import load
    except ModuleNotFoundError:
        load = None
    if load is not None:
        return load(path, adapter=adapter) if adapter else load(path)
    from llmlab.model.checkpoint import load_checkpoint

    if adapter:
        raise LLMLabError("loading adapters needs llmlab.loading")
    return load_checkpoint(path)
