"""Speculative decoding: a cheap proposer drafts ``k`` tokens, the target checks them in one forward pass.

Acceptance is the exact rejection-sampling rule of Leviathan et al. (2023) and Chen et al. (2023): draft
token ``d_i ~ q_i`` is kept with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection the
token is resampled from ``norm(max(0, p_i - q_i))`` and the rest is dropped; if all ``k`` are kept, a bonus
token is drawn from ``p_{k+1}``. Every emitted token is then distributed exactly as the target's own sample
(``p`` and ``q`` are the *processed* distributions: penalties, temperature and filters included), and with
greedy decoding the output is the target's greedy output.

Three proposers:

- ``method="draft"``: a smaller model with the same tokenizer (its own paged cache);
- ``method="ngram"``: prompt lookup (Saxena 2023). The last ``n`` tokens are searched for earlier in the
  context and the tokens that followed are proposed; no draft model. ``q`` is then a point mass, so the rule
  reduces to "keep with probability ``p(d)``, else resample from ``p`` without ``d``";
- ``method="medusa"``: Medusa heads (Cai et al. 2024, :mod:`llmlab.medusa.heads`) on the target's own last
  hidden state. The heads run inside the verify forward, their rows sharing the target's LM-head matmul
  (:mod:`llmlab.infer.medusa_state`); the heads' logits under the newest token are kept per request, and at
  the next step head ``k`` drafts token ``k`` of a single chain from them (``q_k``: the head's processed
  distribution, which ignores the drafts before it -- still a valid proposal). A request with no current
  head state (just prefilled, or after a plain decode step) drafts nothing for one step.

Speculation is the engine's decode step: the running requests are drafted and verified together, so it
combines with continuous batching and streaming (batch 1 is where it pays on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.infer.medusa_state import MedusaState
from llmlab.infer.runner import ModelRunner, score
from llmlab.infer.sampling import SamplingParams, process_logits
from llmlab.infer.scheduler import Request, Scheduler
from llmlab.medusa.heads import MedusaHeads, check_heads, load_heads


class DraftEngine(Protocol):
    """What a draft model offers the decoder: an engine (``LLM``) over the same vocabulary."""

    runner: ModelRunner
    scheduler: Scheduler
    vocab_size: int


@dataclass
class SpeculativeConfig:
    method: str = "ngram"  # "ngram" (prompt lookup) | "draft" | "medusa"
    num_tokens: int = 4  # k: tokens proposed per step (medusa: at most the number of heads)
    draft_model: Any = None  # a Transformer or a path (method="draft")
    heads: Any = None  # a Medusa heads directory or MedusaHeads (method="medusa")
    # Medusa candidate tree (paths of top-k ranks, e.g. [[0], [1], [0, 0]]; "default": medusa.tree's)
    # verified in one forward for greedy requests; None: a single chain of num_tokens.
    tree: Any = None
    ngram_max: int = 3
    ngram_min: int = 1

    def validate(self) -> None:
        if self.method not in ("ngram", "draft", "medusa"):
            raise LLMLabError(
                f"speculative 'method' must be 'ngram', 'draft' or 'medusa', got {self.method!r}"
            )
        if self.num_tokens <= 0:
            raise LLMLabError(f"speculative 'num_tokens' must be positive, got {self.num_tokens}")
        if self.method == "draft" and self.draft_model is None:
            raise LLMLabError("speculative method 'draft' needs 'draft_model'")
        if self.method == "medusa" and self.heads is None:
            raise LLMLabError(
                "speculative method 'medusa' needs 'heads' (a directory from 'llmlab medusa MODEL --out DIR')"
            )
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise LLMLabError("speculative needs 1 <= ngram_min <= ngram_max")

    @classmethod
    def parse(cls, spec: Any) -> SpeculativeConfig:
        """``"ngram"``/``"draft"``/``"medusa"``, a dict of these fields, or a config; validated."""
        if isinstance(spec, str):
            spec = cls(method=spec)
        elif isinstance(spec, dict):
            known = cls.__dataclass_fields__
            unknown = [k for k in spec if k not in known]
            if unknown:
                raise LLMLabError(f"unknown speculative option {unknown[0]!r} (known: {', '.join(known)})")
            spec = cls(**spec)
        elif not isinstance(spec, cls):
            raise LLMLabError(f"option 'speculative' must be a method name or a dict, got {spec!r}")
        spec.validate()
        return spec


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
    if not params.greedy:
        probs = torch.softmax(processed.reshape(-1).float(), dim=-1).cpu()
        if bool(torch.isfinite(probs).all()) and float(probs.sum()) > 0.0:
            return probs
        # The logits overflowed (a temperature or penalty near 0): the distribution's limit is a point mass on
        # the largest logit, as in sampling.sample_from, so the acceptance rule still sees a valid p or q.
    out = torch.zeros(processed.shape[-1])
    out[int(torch.nan_to_num(processed.reshape(-1).float(), nan=float("-inf")).argmax())] = 1.0
    return out


# ---------------------------------------------------------------------------------- the driver
class SpeculativeDecoder:
    """Draft-and-verify decode steps over an engine's scheduler and runner (and a draft engine's)."""

    def __init__(
        self, scheduler: Scheduler, runner: ModelRunner, cfg: SpeculativeConfig, draft: DraftEngine | None
    ):
        cfg.validate()
        if scheduler.cache.sinks is not None:
            raise LLMLabError(
                "speculative decoding does not combine with attention sinks (rollback needs absolute positions)"
            )
        self.scheduler = scheduler
        self.runner = runner
        self.cfg = cfg
        self.draft = draft
        self._draft_seqs: dict[str, int] = {}  # request id -> its sequence in the draft's cache
        self.heads: MedusaHeads | None = None
        self.medusa: MedusaState | None = None  # per request: the heads' logits under its newest token
        if cfg.method == "medusa":
            self.heads = medusa_heads_for(cfg.heads, runner.model)
            self.medusa = MedusaState(self.heads, runner, cfg.num_tokens)
        scheduler.on_free.append(self.release)
        self.stats = {"steps": 0, "proposed": 0, "accepted": 0, "emitted": 0}

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / proposed drafts."""
        return self.stats["accepted"] / max(1, self.stats["proposed"])

    @property
    def mean_accepted_len(self) -> float:
        """Tokens emitted per request per verify step (accepted drafts plus the correction/bonus token)."""
        return self.stats["emitted"] / max(1, self.stats["steps"])

    def _room(self, req: Request, tokens: list[int]) -> int:
        """How many drafts fit: leave one token for the correction/bonus within max_tokens and the context.
        Requests with logits processors (e.g. constrained decoding) take none: their processors see one
        token at a time."""
        if req.params.logits_processors:
            return 0
        room = req.params.max_tokens - len(req.output_ids) - 1
        if self.scheduler.max_model_len is not None:
            room = min(room, self.scheduler.max_model_len - len(tokens) - 1)
        return max(0, min(self.cfg.num_tokens, room))

    def release(self, req: Request) -> None:
        """Free the draft model's copy of a finished, cancelled or preempted request."""
        if self.medusa is not None:
            self.medusa.drop(req.id)
        seq = self._draft_seqs.pop(req.id, None)
        if seq is not None and self.draft is not None:
            self.draft.runner.cache.free_sequence(seq)

    def decode_step(self, reqs: list[Request]) -> bool:
        """One draft-and-verify step for every running request: the engine's decode step under speculation.

        Each request gets its own drafts (``k`` each, fewer near ``max_tokens``); the target scores all rows
        in one forward of ``[B, K + 1]`` tokens (rows with fewer drafts are padded; the padding's cache
        entries are rolled back with the rejected drafts). Returns False, having done nothing, when no row
        has room for a draft or the pool cannot hold ``K + 1`` more tokens per row: the engine then runs a
        plain decode step (which may preempt).
        """
        sched, runner = self.scheduler, self.runner
        cache = runner.cache
        tokens = [r.all_token_ids for r in reqs]
        rooms = [self._room(r, t) for r, t in zip(reqs, tokens, strict=True)]
        K = max(rooms)
        if sched.max_model_len is not None:  # padded rows must stay inside the context too
            K = min(K, min(sched.max_model_len - len(t) for t in tokens))
        if K <= 0 or not sched.fits(reqs, K + 1):
            return False
        if self.draft is not None:  # the draft catches up on the committed tokens, then drafts K more
            dc = self.draft.runner.cache
            seqs = [self._draft_seqs.get(r.id) for r in reqs]
            need = sum(
                dc.blocks_needed(s, len(t) - (dc.length(s) if s is not None else 0) + K)
                for s, t in zip(seqs, tokens, strict=True)
            )
            if need > dc.num_free_blocks:
                return False
        proposals: list[tuple[list[int], Tensor | None]] = []
        if self.heads is not None:
            proposals = self._medusa(reqs, tokens, [min(k, K) for k in rooms])
        for r, t, k in zip(reqs, tokens, rooms, strict=True):
            k = min(k, K)
            if self.heads is not None:
                continue
            if k == 0:
                proposals.append(([], None))
            elif self.draft is None:
                proposals.append((ngram_propose(t, k, self.cfg.ngram_max, self.cfg.ngram_min), None))
            else:
                if r.id not in self._draft_seqs:
                    seq = self._draft_seqs[r.id] = self.draft.scheduler.new_seq_id()
                    self.draft.runner.cache.add_sequence(seq)
                proposals.append(self._draft(r, t, self._draft_seqs[r.id], k))
        ids = [[t[-1], *d, *[t[-1]] * (K - len(d))] for t, (d, _) in zip(tokens, proposals, strict=True)]
        medusa = self.medusa
        out = runner.forward(
            torch.tensor(ids, device=runner.device),
            [r.seq_id for r in reqs],
            last_only=False,
            with_hidden=medusa is not None,
            extra_rows=medusa.extra_rows(len(reqs), list(range(K + 1))) if medusa is not None else None,
        )
        if medusa is None:
            logits, hidden, head_rows = out, None, None
        else:  # (logits, hidden) or, with the heads fused into the LM-head read, their logits too
            logits, hidden, head_rows = out if len(out) == 3 else (*out, None)
        for row, (r, t, (drafts, q)) in enumerate(zip(reqs, tokens, proposals, strict=True)):
            params = r.params
            processed, p = [], []
            for i in range(len(drafts) + 1):
                proc = process_logits(logits[row, i], params, r.prompt_ids, r.output_ids + drafts[:i])
                processed.append(proc)
                p.append(_probs(proc, params))
            n, nxt = verify(torch.stack(p), q, drafts, runner.generator_for(r), params.greedy)
            self.stats["steps"] += 1
            self.stats["proposed"] += len(drafts)
            self.stats["accepted"] += n
            finished = False
            for i, tok in enumerate(drafts[:n] + [nxt]):
                lp, top = score(logits[row, i], processed[i], tok, r)
                self.stats["emitted"] += 1
                if sched.append_token(r, tok, lp, top):
                    finished = True
                    break
            if finished:
                continue  # finishing freed its blocks, the draft's too
            if medusa is not None:  # the state whose next token is the one just emitted: the heads' input
                medusa.keep(r, row, n, hidden, head_rows)
            committed = len(t) - 1 + n + 1  # the cache holds every committed token but the newest
            cache.truncate(r.seq_id, committed)
            seq = self._draft_seqs.get(r.id)
            if seq is not None:
                dc = self.draft.runner.cache
                dc.truncate(seq, min(dc.length(seq), committed))
        return True

    def _medusa(
        self, reqs: list[Request], tokens: list[list[int]], ks: list[int]
    ) -> list[tuple[list[int], Tensor | None]]:
        """Chain drafts from the Medusa heads: ``ks[i]`` tokens for request ``i`` (none without a current
        head state), with the heads' processed distributions ``q`` for sampled requests."""
        rows = [
            i
            for i, (r, t, k) in enumerate(zip(reqs, tokens, ks, strict=True))
            if k > 0 and self.medusa.ready(r, t)
        ]
        proposals: list[tuple[list[int], Tensor | None]] = [([], None)] * len(reqs)
        if not rows:
            return proposals
        num = min(self.heads.num_heads, max(ks[i] for i in rows))
        head_logits = self.medusa.logits([reqs[i] for i in rows], num)
        for row, i in enumerate(rows):
            r, params = reqs[i], reqs[i].params
            generator = self.runner.generator_for(r)
            drafts: list[int] = []
            qs = []
            for j in range(min(ks[i], num)):
                if params.greedy and not params.needs_history:
                    drafts.append(int(head_logits[row, j].argmax()))
                    continue
                proc = process_logits(head_logits[row, j], params, r.prompt_ids, r.output_ids + drafts)
                q = _probs(proc, params)
                d = int(q.argmax()) if params.greedy else int(torch.multinomial(q, 1, generator=generator))
                drafts.append(d)
                qs.append(q)
            proposals[i] = (drafts, torch.stack(qs) if qs else None)
        return proposals

    def _draft(self, req: Request, tokens: list[int], seq: int, k: int) -> tuple[list[int], Tensor]:
        """Sample ``k`` drafts from the draft model (catching its cache up on committed tokens first)."""
        runner, params = self.draft.runner, req.params
        feed = tokens[runner.cache.length(seq) :]
        drafts: list[int] = []
        qs = []
        generator = self.runner.generator_for(req)
        for _ in range(k):
            logits = runner.forward(torch.tensor([feed], device=runner.device), [seq], last_only=True)[0]
            proc = process_logits(logits, params, req.prompt_ids, req.output_ids + drafts)
            q = _probs(proc, params)
            d = int(q.argmax()) if params.greedy else int(torch.multinomial(q, 1, generator=generator))
            drafts.append(d)
            qs.append(q)
            feed = [d]
        return drafts, torch.stack(qs)


def medusa_heads_for(heads: Any, model: Any) -> MedusaHeads:
    """Medusa heads (a directory or a :class:`MedusaHeads`) checked against the target and on its device."""
    if isinstance(heads, MedusaHeads):
        check_heads(heads.config, model, "the Medusa heads")
        param = next(model.parameters())
        return heads.to(device=param.device, dtype=param.dtype).eval()
    return load_heads(heads, model)
