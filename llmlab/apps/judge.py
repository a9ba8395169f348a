"""An LLM judge for AI feedback (RLAIF): which of two answers is better, through a fixed rubric prompt.

The judge (any model ``llmlab.LLM`` loads; SmolLM2-135M-Instruct by default) reads :data:`RUBRIC` with the
two answers labelled A and B and writes one letter. Its preference is read from the first generated token's
log-probabilities (the engine's ``top_logprobs``), not from a sampled letter:

    p_AB = P(first better | order x, y) = exp(l_A) / (exp(l_A) + exp(l_B))

with ``l_A`` (``l_B``) the log-sum-exp of the model's logits over the tokens spelling ``A`` (``B``), with or
without a leading space: the first token is restricted to those letters by a logits processor and read back
as the engine's processed ``top_logprobs``, i.e. the model's choice given that it answers with a letter.
Asked in both orders,

    p(x better) = (p_AB(x, y) + 1 - p_AB(y, x)) / 2

cancels a constant position bias. Reported with it: **self-agreement** (the share of pairs whose verdict
survives the swap: ``p_AB(x, y) > 1/2`` iff ``p_AB(y, x) < 1/2``), the **first-position rate** (the share of
single-order verdicts for whatever was shown first; 0.5 for an unbiased judge) and, where ground truth exists
(:func:`agreement`), the share of pairs where the debiased verdict picks the human/verifier-preferred answer,
with its 95% Wilson interval.

The labels (:func:`label_pairs`) are preference records ``{"prompt", "chosen", "rejected", "margin"}`` that
``llmlab rm --data`` and ``llmlab align --data`` read as they are: AI feedback trains the reward model or DPO
directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmlab.errors import LLMLabError
from llmlab.eval.metrics import wilson_interval
from llmlab.infer import LLM, SamplingParams

RUBRIC = (
    "Compare two answers to the same request.\n\n"
    "Request:\n{request}\n\n"
    "Answer A:\n{first}\n\n"
    "Answer B:\n{second}\n\n"
    "Which answer is better: correct, helpful and harmless? Reply with one letter, A or B."
)
MAX_ANSWER_CHARS = 1500  # longer answers are cut (with a marker) so both fit the judge's context


def _clip(text: str, limit: int = MAX_ANSWER_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " [...]"


def request_text(prompt: str | Sequence[dict[str, str]]) -> str:
    """A conversation as the judge reads it: the last user turn alone, or ``User:``/``Assistant:`` lines."""
    if isinstance(prompt, str):
        return _clip(prompt)
    turns = list(prompt)
    if len(turns) == 1:
        return _clip(turns[0]["content"])
    return _clip(
        "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns)
    )


def letter_ids(tokenizer: Any, letter: str) -> list[int]:
    """Token ids that spell ``letter`` alone (with or without a leading space)."""
    ids = set()
    for text in (letter, f" {letter}"):
        encoded = tokenizer.encode_batch([text], split_special_tokens=True)[0]
        if len(encoded) == 1:
            ids.add(encoded[0])
    if not ids:
        raise LLMLabError(
            f"the judge's tokenizer has no single token for {letter!r}: it cannot answer the rubric"
        )
    return sorted(ids)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top if top == -math.inf else top + math.log(sum(math.exp(v - top) for v in values))


@dataclass
class Judgement:
    """Both orders of one pair: ``p_ab`` (x shown first), ``p_ba`` (y shown first), ``p`` (x better)."""

    p_ab: float
    p_ba: float

    @property
    def p(self) -> float:
        return 0.5 * (self.p_ab + 1.0 - self.p_ba)

    @property
    def consistent(self) -> bool:
        return (self.p_ab > 0.5) == (self.p_ba < 0.5) and self.p_ab != 0.5 and self.p_ba != 0.5


class Judge:
    """A pairwise judge over an engine: :meth:`first_better` (one order) and :meth:`compare` (both)."""

    def __init__(self, llm: LLM, rubric: str = RUBRIC, system: str | None = None):
        if llm.tokenizer is None:
            raise LLMLabError("the judge model has no tokenizer")
        self.llm, self.rubric, self.system = llm, rubric, system
        self.a_ids, self.b_ids = letter_ids(llm.tokenizer, "A"), letter_ids(llm.tokenizer, "B")
        self.tokens_generated = 0
        self._check_template()

    def _check_template(self) -> None:
        """Render the rubric once through the judge's chat template: a template that fails on it, or that
        drops its text (e.g. one that knows no user turn), cannot judge anything."""
        probe = ("JUDGE-PROBE-REQUEST", "JUDGE-PROBE-FIRST", "JUDGE-PROBE-SECOND")
        try:
            text = self.llm.encode_prompt(self._messages(*probe))[0] or ""
        except LLMLabError as exc:
            raise LLMLabError(f"the judge's chat template cannot render the rubric: {exc}") from exc
        lost = [marker for marker in probe if marker not in text]
        if lost:
            raise LLMLabError(
                f"the judge's chat template cannot render the rubric: its output lacks the rubric's text "
                f"({lost[0]} is missing)"
            )

    def _messages(self, request: str, first: str, second: str) -> list[dict[str, str]]:
        try:
            content = self.rubric.format(request=request, first=_clip(first), second=_clip(second))
        except (KeyError, IndexError) as exc:
            raise LLMLabError(
                f"judge rubric: unknown placeholder {exc} (use {{request}}, {{first}}, {{second}})"
            ) from exc
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": content}]

    def first_better(
        self, prompts: Sequence[Any], firsts: Sequence[str], seconds: Sequence[str]
    ) -> list[float]:
        """P(the first-shown answer is better) per pair, from the letter log-probabilities (one batch)."""
        convs = [
            self._messages(request_text(p), a, b) for p, a, b in zip(prompts, firsts, seconds, strict=True)
        ]
        allowed = torch.tensor(self.a_ids + self.b_ids)

        def letters_only(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
            masked = torch.full_like(logits, float("-inf"))
            masked[allowed] = logits[allowed]
            return masked

        # temperature 1: the processed log-probabilities are the model's own, renormalized over the letters.
        params = SamplingParams(max_tokens=1, temperature=1.0, seed=0, top_logprobs=len(allowed),
                                logprobs_mode="processed", logits_processors=[letters_only])  # fmt: skip
        try:
            outs = self.llm.generate(convs, params)
        except LLMLabError as exc:
            raise LLMLabError(f"the judge cannot read the rubric: {exc}") from exc
        probs = []
        for out in outs:
            self.tokens_generated += len(out.token_ids)
            top = out.top_logprobs[0] if out.top_logprobs else {}
            la = _logsumexp([top.get(i, -math.inf) for i in self.a_ids])
            lb = _logsumexp([top.get(i, -math.inf) for i in self.b_ids])
            probs.append(0.5 if la == lb else 1.0 / (1.0 + math.exp(min(lb - la, 700.0))))
        return probs

    def compare(self, prompts: Sequence[Any], xs: Sequence[str], ys: Sequence[str]) -> list[Judgement]:
        """Each pair judged in both orders (x first, then y first) in one batch."""
        n = len(xs)
        p = self.first_better([*prompts, *prompts], [*xs, *ys], [*ys, *xs])
        return [Judgement(p[i], p[n + i]) for i in range(n)]


def summarize(judgements: Sequence[Judgement], truth_first: Sequence[bool] | None = None) -> dict[str, Any]:
    """Self-agreement, first-position rate and (with ``truth_first``: is x the preferred answer?) agreement
    with ground truth, debiased and single-order, each with its 95% Wilson interval."""
    n = len(judgements)
    if n == 0:
        raise LLMLabError("no pairs to judge")
    consistent = sum(j.consistent for j in judgements)
    first_votes = sum((j.p_ab > 0.5) + (j.p_ba > 0.5) for j in judgements)
    out: dict[str, Any] = {
        "n": n,
        "self_agreement": round(consistent / n, 4),
        "self_agreement_ci95": [round(v, 4) for v in wilson_interval(consistent, n)],
        "first_position_rate": round(first_votes / (2 * n), 4),
    }
    if truth_first is not None:
        right = sum((j.p > 0.5) == t for j, t in zip(judgements, truth_first, strict=True))
        ties = sum(j.p == 0.5 for j in judgements)
        single = sum((j.p_ab > 0.5) == t for j, t in zip(judgements, truth_first, strict=True))
        out.update(
            agreement=round(right / n, 4),
            agreement_ci95=[round(v, 4) for v in wilson_interval(right, n)],
            agreement_single_order=round(single / n, 4),
            ties=ties,
        )
    return out


def agreement(judge: Judge, pairs: Sequence[Any]) -> dict[str, Any]:
    """The judge on preference pairs with a known winner (``llmlab.align.data.PreferencePair``: ``chosen`` is
    right). Half the pairs show ``chosen`` as x, half ``rejected``, so a judge that always answers x scores 50%."""
    xs = [p.chosen if i % 2 == 0 else p.rejected for i, p in enumerate(pairs)]
    ys = [p.rejected if i % 2 == 0 else p.chosen for i, p in enumerate(pairs)]
    judgements = judge.compare([p.prompt for p in pairs], xs, ys)
    return summarize(judgements, [i % 2 == 0 for i in range(len(pairs))])


def label_pairs(
    judge: Judge, prompts: Sequence[Any], xs: Sequence[str], ys: Sequence[str], min_margin: float = 0.0
) -> list[dict[str, Any]]:
    """Preference records from the judge's debiased verdicts; pairs with ``|2p - 1| <= min_margin`` (too close
    to call, e.g. a verdict that flips with the order) are dropped."""
    return records_from(prompts, xs, ys, judge.compare(prompts, xs, ys), min_margin)


def records_from(
    prompts: Sequence[Any],
    xs: Sequence[str],
    ys: Sequence[str],
    judgements: Sequence[Judgement],
    min_margin: float = 0.0,
) -> list[dict[str, Any]]:
    """:func:`label_pairs` on judgements already made (the same filter and record shape)."""
    records = []
    for prompt, x, y, j in zip(prompts, xs, ys, judgements, strict=True):
        margin = abs(2 * j.p - 1)
        if margin <= min_margin or x.strip() == y.strip():
            continue
        chosen, rejected = (x, y) if j.p > 0.5 else (y, x)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": round(margin, 4)})
    return records
