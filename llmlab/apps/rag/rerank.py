"""Reranking by the LLM's own judgement: the log-odds that it answers "yes" to "does this passage answer the
question?".

    score(passage) = logsumexp_{t in YES} log p(t | prompt) - logsumexp_{t in NO} log p(t | prompt)

over the first generated token, where YES/NO are the spellings of yes/no ("yes", "Yes", " yes", ...) that are
single tokens (on SmolLM2's tokenizer all but "YES", which splits into "Y" + "ES"), or the first token of each
spelling on a tokenizer where none is. A spelling outside the engine's top-20 log-probabilities counts as
``log p = min(top-20) - 1`` (it is at most that likely). No cross-encoder reranker ships inside a PyPI package (they download their weights), so
this is the offline option. The passage sits in the user turn, delimited, as in answering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from llmlab.apps.rag.hits import Hit

JUDGE_SYSTEM = "You judge whether a passage answers a question. Reply with one word: yes or no."
YES = ("yes", "Yes", " yes", " Yes", "YES")
NO = ("no", "No", " no", " No", "NO")
MAX_PASSAGE_CHARS = 1500


def judge_messages(question: str, passage: str) -> list[dict[str, str]]:
    passage = passage.strip()[:MAX_PASSAGE_CHARS].replace("</passage", "</ passage")
    user = (
        f"<passage>\n{passage}\n</passage>\n\nQuestion: {question}\n"
        "Does the passage contain the answer to the question? Answer yes or no."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def answer_token_ids(tokenizer: Any, spellings: Sequence[str]) -> list[int]:
    """Ids of the spellings that are one token; if none is, the first token of each (tiny tokenizers)."""
    encoded = [list(getattr(e, "ids", e)) for e in (tokenizer.encode(s) for s in spellings)]
    single = [e[0] for e in encoded if len(e) == 1]
    chosen = single or [e[0] for e in encoded if e]
    return list(dict.fromkeys(int(t) for t in chosen))


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def yes_no_score(top_logprobs: dict[int, float], yes_ids: list[int], no_ids: list[int]) -> float:
    """``log P(yes) - log P(no)`` from one token's top log-probabilities (see the module docstring)."""
    floor = min(top_logprobs.values()) - 1.0 if top_logprobs else -30.0
    yes = _logsumexp([top_logprobs.get(t, floor) for t in yes_ids])
    no = _logsumexp([top_logprobs.get(t, floor) for t in no_ids])
    return yes - no


def llm_rerank(llm: Any, question: str, hits: list[Hit]) -> list[Hit]:
    """``hits`` reordered by the LLM's yes/no log-odds (stable for ties); each hit's ``score`` becomes it."""
    from llmlab.errors import ConfigError
    from llmlab.infer import SamplingParams  # torch: only when reranking

    if llm is None:
        raise ConfigError("reranking needs a model (pass --model / llm=)")
    if not hits:
        return hits
    yes_ids = answer_token_ids(llm.tokenizer, YES)
    no_ids = [t for t in answer_token_ids(llm.tokenizer, NO) if t not in yes_ids]
    if not yes_ids or not no_ids:
        raise ConfigError("this model's tokenizer cannot tell 'yes' from 'no' by one token: it cannot rerank")
    params = SamplingParams(temperature=0.0, max_tokens=1, top_logprobs=20)
    outs = llm.generate([judge_messages(question, h.text) for h in hits], params)
    scored = []
    for hit, out in zip(hits, outs):
        top = out.top_logprobs[0] if out.top_logprobs else {}
        hit.score = yes_no_score(top, yes_ids, no_ids)
        scored.append(hit)
    return sorted(scored, key=lambda h: -h.score)
