"""Speculative decoding: a cheap proposer drafts ``k`` tokens, the target checks them in one forward pass.

Acceptance is the exact rejection-sampling rule of Leviathan et al. (2023) and Chen et al. (2023): draft
token ``d_i ~ q_i`` is kept with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection the
token is resampled from ``norm(max(0, p_i - q_i))`` and the rest is dropped; if all ``k`` are kept, a bonus
token is drawn from ``p_{k+1}``. Every emitted token is then distributed exactly as the target's own sample
(``p`` and ``q`` are the *processed* distributions: penalties, temperature and filters included), and with
greedy decoding the output is the target's greedy output.

Two proposers:

- ``method="draft"``: a smaller model with the same tokenizer (its own paged cache);
- ``method="ngram"``: prompt lookup (Saxena 2023). The last ``n`` tokens are searched for earlier in the
  context and the tokens that followed are proposed; no draft model. ``q`` is then a point mass, so the rule
  reduces to "keep with probability ``p(d)``, else resample from ``p`` without ``d``".

Requests go through one at a time (batch 1, where speculation pays on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.infer.sampling import SamplingParams, chosen_logprob, process_logits


@dataclass
class SpeculativeConfig:
    method: str = "ngram"  # "ngram" (prompt lookup) | "draft"
    num_tokens: int = 4  # k: tokens proposed per step
    draft_model: Any = None  # a Transformer or a path (method="draft")
    ngram_max: int = 3
    ngram_min: int = 1

    def validate(self) -> None:
        if self.method not in ("ngram", "draft"):
            raise LLMLabError(f"speculative 'method' must be 'ngram' or 'draft', got {self.method!r}")
        if self.num_tokens <= 0:
            raise LLMLabError(f"speculative 'num_tokens' must be positive, got {self.num_tokens}")
        if self.method == "draft" and self.draft_model is None:
            raise LLMLabError("speculative method 'draft' needs 'draft_model'")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise LLMLabError("speculative needs 1 <= ngram_min <= ngram_max")


# ---------------------------------------------------------------------------------- pure parts
def verify(
    p: Tensor, q: Tensor | None, drafts: list[int], generator: torch.Generator | None, greedy: bool
) -> tuple[int, int]:
    """Rejection-sample ``drafts`` against the target.

    ``p [k+1, V]``: target probabilities at each draft position plus the bonus position; ``q [k, V]``: the
    proposer's probabilities (``None``: deterministic drafts, a point mass on each). Returns ``(n, token)``:
    the first ``n`` drafts are accepted and ``token`` follows them.
    """
    for i, d in enumerate(drafts):
        if greedy:
            best = int(p[i].argmax())
            if best != d:
                return i, best
            continue
        q_d = 1.0 if q is None else float(q[i, d])
        ratio = float(p[i, d]) / q_d if q_d > 0 else 0.0
        r = float(torch.rand((), generator=generator))
        if r < min(1.0, ratio):
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q: never rejected in exact arithmetic; fall back to p
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    last = p[len(drafts)]
    if greedy:
        return len(drafts), int(last.argmax())
    return len(drafts), int(torch.multinomial(last, 1, generator=generator))


def ngram_propose(tokens: list[int], k: int, n_max: int = 3, n_min: int = 1) -> list[int]:
    """Prompt lookup: the ``k`` tokens that followed the latest earlier match of the longest suffix n-gram."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = tokens[L - n :]
        for start in range(L - n - 1, -1, -1):  # most recent match first
            if tokens[start : start + n] == suffix:
                follow = tokens[start + n : start + n + k]
                if follow:
                    return follow
    return []


def _probs(processed: Tensor, params: SamplingParams) -> Tensor:
    """Sampling distribution of processed logits ``[1, V]`` (one-hot on the argmax when greedy), on the CPU:
    the draws use the request's CPU generator, and every row is read back right away anyway."""
    if params.greedy:
        out = torch.zeros(processed.shape[-1])
        out[int(processed.argmax())] = 1.0
        return out
    return torch.softmax(processed.reshape(-1).float(), dim=-1).cpu()


# ---------------------------------------------------------------------------------- the driver
class SpeculativeDecoder:
    """Runs requests of an :class:`~llmlab.infer.LLM` through draft-and-verify steps."""

    def __init__(self, engine: Any, cfg: SpeculativeConfig):
        cfg.validate()
        if engine.attention_sinks is not None:
            raise LLMLabError(
                "speculative decoding does not combine with attention sinks (rollback needs absolute positions)"
            )
        self.engine = engine
        self.cfg = cfg
        self.draft = None
        if cfg.method == "draft":
            from llmlab.infer.engine import LLM

            opts = {
                "max_batch_size": 1,
                "max_model_len": engine.max_model_len,
                "fast": engine.fast.weights if engine.fast else False,
            }
            if isinstance(cfg.draft_model, LLM):
                self.draft = cfg.draft_model
            elif isinstance(cfg.draft_model, torch.nn.Module):
                self.draft = LLM.from_model(cfg.draft_model, engine.tokenizer, **opts)
            else:
                self.draft = LLM(cfg.draft_model, engine.tokenizer, **opts)
            if self.draft.vocab_size != engine.vocab_size:
                raise LLMLabError(
                    f"draft vocabulary ({self.draft.vocab_size}) differs from the target's ({engine.vocab_size})"
                )
        self.stats = {"steps": 0, "proposed": 0, "accepted": 0, "emitted": 0}

    @classmethod
    def create(cls, engine: Any, spec: Any) -> SpeculativeDecoder:
        if isinstance(spec, str):
            spec = SpeculativeConfig(method=spec)
        elif isinstance(spec, dict):
            known = SpeculativeConfig.__dataclass_fields__
            unknown = [k for k in spec if k not in known]
            if unknown:
                raise LLMLabError(f"unknown speculative option {unknown[0]!r} (known: {', '.join(known)})")
            spec = SpeculativeConfig(**spec)
        return cls(engine, spec)

    @property
    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / max(1, self.stats["proposed"])

    def generate_one(self, text: str | None, prompt_ids: list[int], params: SamplingParams):
        """Generate one request to completion; returns its final :class:`RequestOutput`."""
        from llmlab.infer.engine import _Request

        eng = self.engine
        req = _Request(f"spec-{next(eng._req_counter)}", text, list(prompt_ids), params, eng)
        cache = eng.cache
        cache.add_sequence(req.seq_id)
        draft_seq = None
        try:
            # Target holds every committed token but the last (the next step's first input).
            tokens = list(prompt_ids)
            for start in range(0, len(tokens) - 1, eng.prefill_chunk):
                chunk = tokens[start : min(start + eng.prefill_chunk, len(tokens) - 1)]
                eng.forward(torch.tensor([chunk]), [req.seq_id])
            if self.draft is not None:
                draft_seq = next(self.draft._seq_counter)
                self.draft.cache.add_sequence(draft_seq)
            while req.finish_reason is None:
                self._step(req, tokens, draft_seq)
        finally:
            cache.free_sequence(req.seq_id)
            if draft_seq is not None:
                self.draft.cache.free_sequence(draft_seq)
        return eng._snapshot(req)

    def _room(self, req: Any, tokens: list[int]) -> int:
        """How many drafts fit: leave one token for the correction/bonus within max_tokens and the context."""
        eng = self.engine
        room = req.params.max_tokens - len(req.output_ids) - 1
        if eng.max_model_len is not None:
            room = min(room, eng.max_model_len - len(tokens) - 1)
        return max(0, min(self.cfg.num_tokens, room))

    def _step(self, req: Any, tokens: list[int], draft_seq: int | None) -> None:
        eng, params = self.engine, req.params
        k = self._room(req, tokens)
        q = None
        if k == 0:
            drafts: list[int] = []
        elif self.draft is None:
            drafts = ngram_propose(tokens, k, self.cfg.ngram_max, self.cfg.ngram_min)
        else:
            drafts, q = self._draft(req, tokens, draft_seq, k)
        C = len(tokens) - 1
        ids = torch.tensor([[tokens[-1], *drafts]])
        logits = eng.forward(ids, [req.seq_id], last_only=False)[0]  # [k+1, V]
        processed, p = [], []
        for i in range(len(drafts) + 1):
            proc = process_logits(logits[i], params, req.prompt_ids, req.output_ids + drafts[:i])
            processed.append(proc)
            p.append(_probs(proc, params))
        n, nxt = verify(torch.stack(p), q, drafts, req.generator, params.greedy)
        self.stats["steps"] += 1
        self.stats["proposed"] += len(drafts)
        self.stats["accepted"] += n
        new = drafts[:n] + [nxt]
        for i, tok in enumerate(new):
            lp = chosen_logprob(logits[i], processed[i], tok, params) if params.logprobs else None
            eng._append(req, tok, lp)
            tokens.append(tok)
            self.stats["emitted"] += 1
            if req.finish_reason is not None:
                break
        if req.finish_reason is not None:
            return  # _finish already freed the target's blocks
        eng.cache.truncate(req.seq_id, C + n + 1)
        if draft_seq is not None:
            dc = self.draft.cache
            dc.truncate(draft_seq, min(dc.length(draft_seq), C + n + 1))

    def _draft(self, req: Any, tokens: list[int], seq: int, k: int) -> tuple[list[int], Tensor]:
        """Sample ``k`` drafts from the draft model (catching its cache up on committed tokens first)."""
        draft, params = self.draft, req.params
        have = draft.cache.length(seq)
        feed = tokens[have:]
        drafts: list[int] = []
        qs = []
        for _ in range(k):
            logits = draft.forward(torch.tensor([feed]), [seq], last_only=True)[0]
            proc = process_logits(logits, params, req.prompt_ids, req.output_ids + drafts)
            q = _probs(proc, params)
            d = int(q.argmax()) if params.greedy else int(torch.multinomial(q, 1, generator=req.generator))
            drafts.append(d)
            qs.append(q)
            feed = [d]
        return drafts, torch.stack(qs)
