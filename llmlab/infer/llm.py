"""The generation engine's front door: ``LLM`` (construction, requests, steps, ``generate`` and ``stream``).

One engine serves every stage that generates (RL rollouts, evaluation, chat, the server)::

    llm = LLM("ckpt/")                              # or LLM.from_model(model, tokenizer)
    outs = llm.generate(["Once upon a time"], SamplingParams(temperature=0.8, max_tokens=64))
    for delta in llm.stream("Hi", SamplingParams()):  # text deltas as they are generated
        print(delta.delta_text, end="")

The parts, as in nano-vllm and vLLM v1: :mod:`~llmlab.infer.scheduler` (queue, admission, preemption,
recording tokens), :mod:`~llmlab.infer.runner` (forward passes, the fast path, sampling),
:mod:`~llmlab.infer.output` (text, stop strings, deltas), :mod:`~llmlab.infer.paged_cache` (blocks,
prefix cache) and :mod:`~llmlab.infer.speculative` (the decode step when speculation is on). Each
:meth:`LLM.step` prefills the requests the scheduler admits, then runs one batched decode (or
draft-and-verify) step over the others, and returns a snapshot of every request that produced tokens.

**Errors.** :meth:`LLM.generate` validates every request before doing any work and raises one
:class:`LLMLabError` naming the bad prompt. :meth:`LLM.add_request` (the server's path) raises for the bad
request only; requests already queued keep running.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmlab.errors import LLMLabError
from llmlab.infer.chat import encode_chat
from llmlab.infer.fast import FastDecoder
from llmlab.infer.medusa_tree import MedusaTreeDecoder
from llmlab.infer.options import apply_rope_scaling, check_options, load_model, pool_blocks, to_dtype
from llmlab.infer.output import OutputProcessor, RequestOutput
from llmlab.infer.paged_cache import PagedKVCache
from llmlab.infer.runner import ModelRunner
from llmlab.infer.sampling import SamplingParams
from llmlab.infer.scheduler import Request, Scheduler
from llmlab.infer.speculative import SpeculativeConfig, SpeculativeDecoder
from llmlab.model.transformer import Transformer

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


class LLM:
    """Generation engine over one :class:`~llmlab.model.Transformer` (see the module docstring).

    Options: ``max_batch_size`` (running requests at once), ``block_size`` and ``kv_cache_mb`` (paged cache
    pool; ``num_blocks`` overrides the size), ``max_model_len`` (context; defaults to the model's, times the
    RoPE scaling factor), ``rope_scaling`` (dict or :class:`RopeScaling`: run past the trained context),
    ``sliding_window`` (blocks the window has passed are freed, so memory is bounded by the window),
    ``attention_sinks=(S, W)`` (StreamingLLM: bounded memory, unbounded length),
    ``prefill_chunk`` (tokens per prefill forward), ``dtype``, ``seed`` (for unseeded sampled requests),
    ``fast`` (fused decode path, on by default where the model allows it; ``fast="int8"``/``"int4"`` also
    store its matmul weights quantized -- faster batch-1 decode, no longer bit-exact; a quantized checkpoint
    runs its own codes on those kernels), ``speculative`` (``"ngram"`` or ``{"method": "draft",
    "draft_model": ..., "num_tokens": 4}`` or ``{"method": "medusa", "heads": DIR, "tree": "default"}``; see
    :mod:`llmlab.infer.speculative`), ``enable_prefix_caching``
    (reuse the KV blocks of identical prompt prefixes, vLLM's automatic prefix caching).

    The engine is not thread-safe: drive ``add_request``/``step``/``abort`` from one thread (a server runs
    them in one loop and hands results to its connections).
    """

    def __init__(self, path: str | Path | None = None, tokenizer: Any = None, **options: Any):
        if path is None:
            raise LLMLabError("LLM() needs a model path (or use LLM.from_model(model, tokenizer))")
        check_options(LLM._setup, options, extra=("adapter",))
        model, loaded_tok = load_model(path, options.pop("adapter", None))
        self._setup(model, tokenizer or loaded_tok, **options)
        self._borrowed_model = False

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any = None, **options: Any) -> LLM:
        """Wrap an in-memory model (e.g. the policy during RL). The engine reads its live weights: training
        the model between calls is seen by the next ``generate``. ``rope_scaling``/``sliding_window``
        options change the model's config in place."""
        check_options(LLM._setup, options)
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
        enable_prefix_caching: bool = False,
    ) -> None:
        if not isinstance(model, Transformer):
            raise LLMLabError(f"LLM needs an llmlab Transformer, got {type(model).__name__}")
        if not getattr(model.cfg, "causal", True):
            raise LLMLabError("model config 'causal' is false: an MLM encoder cannot generate left to right")
        if dtype is not None:
            model = model.to(to_dtype(dtype))
        self.model = model  # left in its mode: forward() runs it in eval mode and restores training mode
        self.tokenizer = tokenizer
        cfg = model.cfg
        if rope_scaling is not None:
            cfg = apply_rope_scaling(model, rope_scaling)
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
            num_blocks = pool_blocks(
                cfg, self.dtype, block_size, kv_cache_mb, max_batch_size, self.max_model_len,
                self.attention_sinks, prefill_chunk,
            )  # fmt: skip
        inv_freq = model.rotary.inv_freq if getattr(model, "rotary", None) is not None else None
        self.cache = PagedKVCache(
            cfg,
            num_blocks,
            block_size,
            self.dtype,
            self.device,
            sinks=self.attention_sinks,
            rope_inv_freq=inv_freq,
            prefix_caching=enable_prefix_caching,
        )
        self.stop_ids: list[int] = list(getattr(tokenizer, "stop_ids", []) or [])
        self.output = OutputProcessor(tokenizer)
        self.scheduler = Scheduler(
            self.cache, max_batch_size, prefill_chunk, self.max_model_len, self.output.find_stop_string
        )
        fast_path = FastDecoder.create(model, fast if isinstance(fast, str) else "same") if fast else None
        self.runner = ModelRunner(model, self.cache, prefill_chunk, fast_path, seed)
        self._req_counter = itertools.count()
        # The decode step under speculation (None: plain decoding). Assignable: a benchmark swaps several
        # decoders made by speculative_decoder() on one engine.
        self.speculative: SpeculativeDecoder | None = None
        if speculative is not None:
            self.speculative = self.speculative_decoder(speculative)

    def speculative_decoder(self, speculative: Any) -> SpeculativeDecoder:
        """A speculative decoder for this engine (``"ngram"``, a dict or a :class:`SpeculativeConfig`)."""
        spec = SpeculativeConfig.parse(speculative)
        draft = self._draft_engine(spec) if spec.method == "draft" else None
        if spec.method == "medusa" and spec.tree is not None:  # a candidate tree (greedy requests)
            return MedusaTreeDecoder(self.scheduler, self.runner, spec)
        return SpeculativeDecoder(self.scheduler, self.runner, spec, draft)

    def _draft_engine(self, spec: SpeculativeConfig) -> LLM:
        opts = {
            "max_batch_size": self.max_batch_size,  # one draft sequence per running request
            "max_model_len": self.max_model_len,
            "fast": self.fast.weights if self.fast else False,
        }
        if isinstance(spec.draft_model, LLM):
            draft = spec.draft_model
        elif isinstance(spec.draft_model, nn.Module):
            draft = LLM.from_model(spec.draft_model, self.tokenizer, **opts)
        else:
            draft = LLM(spec.draft_model, self.tokenizer, **opts)
        if draft.vocab_size != self.vocab_size:
            raise LLMLabError(
                f"draft vocabulary ({draft.vocab_size}) differs from the target's ({self.vocab_size})"
            )
        return draft

    # ------------------------------------------------------------------------------ state
    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def fast(self) -> FastDecoder | None:
        """The fused fast path in use (None: the model's own forward). Settable (benchmarks compare)."""
        return self.runner.fast

    @fast.setter
    def fast(self, value: FastDecoder | None) -> None:
        self.runner.fast = value

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def waiting(self) -> Sequence[Request]:
        return self.scheduler.waiting

    @property
    def requests(self) -> dict[str, Request]:
        return self.scheduler.requests

    @property
    def stats(self) -> dict[str, float]:
        """Counters and gauges (a fresh dict): queue, KV cache, prefix cache, tokens, speculation.

        ``kv_blocks_used`` counts blocks some request holds; unreferenced prefix-cache blocks are in
        ``kv_blocks_cached`` (reclaimable, so not "used"). ``prefix_cache_queries``/``hits`` are prompt
        tokens looked up / found. ``spec_mean_accepted_len`` is tokens emitted per request per verify step.
        """
        sched, cache, spec = self.scheduler, self.cache, self.speculative
        s = spec.stats if spec is not None else {"proposed": 0, "accepted": 0}
        return {
            "num_running": len(sched.running),
            "num_waiting": len(sched.waiting),
            "kv_cache_usage": cache.num_used_blocks / cache.num_blocks,
            "kv_blocks_used": cache.num_used_blocks,
            "kv_blocks_cached": cache.num_cached_blocks,
            "kv_blocks_total": cache.num_blocks,
            "kv_capacity_tokens": cache.num_blocks * cache.block_size,
            "prefix_cache_queries": sched.prefix_cache_queries,
            "prefix_cache_hits": sched.prefix_cache_hits,
            "prompt_tokens_total": sched.prompt_tokens_total,
            "generation_tokens_total": sched.generation_tokens_total,
            "prefill_tokens": self.runner.prefill_tokens,
            "decode_tokens": self.runner.decode_tokens,
            "preemptions": sched.num_preemptions,
            "spec_draft_tokens": s["proposed"],
            "spec_accepted_tokens": s["accepted"],
            "spec_acceptance_rate": spec.acceptance_rate if spec is not None else 0.0,
            "spec_mean_accepted_len": spec.mean_accepted_len if spec is not None else 0.0,
        }

    # ----------------------------------------------------------------------------- prompts
    def encode_prompt(
        self, prompt: Prompt, add_generation_prompt: bool = True
    ) -> tuple[str | None, list[int]]:
        """Prompt -> (text or None, token ids): a string, a list of token ids, or a chat message list."""
        if isinstance(prompt, str):
            return prompt, self._tok().encode(prompt)
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
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

    def _new_request(
        self, rid: str, text: str | None, ids: list[int], params: SamplingParams, stream: bool
    ) -> Request:
        seq_id = self.scheduler.new_seq_id()
        req = Request(rid, text, ids, params, seq_id, set(self.stop_ids), stream=stream)
        self.scheduler.add(req)
        return req

    # --------------------------------------------------------------------------- request API
    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue one request; returns its id. A bad request raises :class:`LLMLabError` and queues nothing."""
        params = params or SamplingParams()
        text, ids = self.encode_prompt(prompt)
        self._check(ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._req_counter)}"
        if rid in self.scheduler.requests:
            raise LLMLabError(f"request id {rid!r} is already in use")
        self._new_request(rid, text, ids, params, stream=True)
        return rid

    def abort(self, request_id: str) -> None:
        """Cancel a request: it leaves the queue or the batch and its cache blocks are freed at once
        (unknown or finished ids are ignored)."""
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One engine iteration: prefill newly admitted requests, then one batched decode step.

        Returns a snapshot (with deltas) of every request that produced a token this step.
        """
        sched, runner = self.scheduler, self.runner
        if not sched.running:  # new work starts: the model may have changed since the last batch
            runner.new_batch()
            if self.speculative is not None and self.speculative.draft is not None:
                self.speculative.draft.runner.new_batch()
            if self._borrowed_model:
                # A borrowed model (from_model) may have been trained since the last batch. Fused optimizers
                # update parameters without bumping their version counters, so the fast path's staleness
                # check cannot see it: re-fuse the weights (and forget cached prefixes).
                if runner.fast is not None:
                    runner.fast.invalidate()
                if self.cache.prefix_caching:
                    self.cache.reset_prefix_cache()
        touched: list[Request] = []
        admitted = sched.admit()
        for req in admitted:
            logits = runner.prefill(req, sched.prefill_tokens(req))
            if not req.output_ids:  # a resumed request already has its next input token
                t = runner.sample(logits, [req])[0]
                sched.append_token(req, t.token, t.logprob, t.top_logprobs)
            if req.output_ids and len(req.output_ids) > req.emitted_tokens:
                touched.append(req)
        sched.cache_computed_blocks([r for r in admitted if not r.finished])
        decoding = [r for r in sched.running if r not in admitted]
        if decoding and not (self.speculative and self.speculative.decode_step(decoding)):
            batch = sched.make_room(decoding, 1)
            if batch:
                logits = runner.decode(batch)
                for req, t in zip(batch, runner.sample(logits, batch), strict=True):
                    sched.append_token(req, t.token, t.logprob, t.top_logprobs)
            # Preempted requests produced nothing; one finished for want of room is reported.
            kept = {id(r) for r in batch}
            decoding = [r for r in decoding if id(r) in kept or r.finished]
        touched.extend(decoding)
        outs = []
        for req in touched:
            outs.append(self.output.snapshot(req))
            if req.finished:
                sched.forget(req)
        return outs

    # ---------------------------------------------------------------------------- front door
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
            self._new_request(rid, text, ids, p, stream=False)
            rids.append(rid)
        pending = set(rids)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm  # optional dependency, only for the progress bar

            bar = tqdm(total=len(rids), desc="generate", unit="req")
        try:
            while pending:
                for out in self.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(tok=self.scheduler.generation_tokens_total)
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
