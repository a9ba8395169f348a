"""Query expansion with the LLM: rewriting, multi-query and HyDE (hypothetical document embeddings).

- ``rewrite``: the LLM turns the question into a keyword search query; both the rewrite and the question are
  searched and fused by RRF (so a poor rewrite cannot lose what the question alone finds);
- ``multi``: the LLM writes ``MULTI_N`` paraphrases; the question and each paraphrase are searched, RRF-fused;
- ``hyde`` (Gao et al. 2022): the LLM writes a short passage that would answer the question; the dense
  search uses that passage's embedding, fused with the question's own ranking by RRF.
"""

from __future__ import annotations

from typing import Any

from llmlab.apps.rag.hits import rrf_fuse
from llmlab.errors import ConfigError

EXPANSIONS = ("rewrite", "multi", "hyde")
MULTI_N = 3
_PROMPTS = {
    "rewrite": "Rewrite this question as a short keyword search query. Reply with the query only.\n\nQuestion: {q}",
    "multi": f"Write {MULTI_N} different rephrasings of this question, one per line, nothing else.\n\nQuestion: {{q}}",
    "hyde": "Write a short encyclopedia-style passage (2-3 sentences) that answers this question.\n\nQuestion: {q}",
}


_MAX_TOKENS = {"rewrite": 48, "multi": 72, "hyde": 96}


def _parse(how: str, text: str) -> list[str]:
    text = text.strip()
    if how == "multi":
        lines = [ln.strip(" -*0123456789.)\t") for ln in text.splitlines()]
        return [ln for ln in lines if ln][:MULTI_N]
    return [text] if text else []


def expand_many(llm: Any, questions: list[str], how: str) -> list[list[str]]:
    """The extra queries (for hyde: the hypothetical passage) for each question, greedy, in one batched
    ``llm.generate`` call."""
    if how not in EXPANSIONS:
        raise ConfigError(f"query expansion {how!r} is not one of {', '.join(EXPANSIONS)}")
    if llm is None:
        raise ConfigError(f"query expansion {how!r} needs a model (pass --model / llm=)")
    from llmlab.infer import SamplingParams  # torch: only when expanding

    prompts = [[{"role": "user", "content": _PROMPTS[how].format(q=q)}] for q in questions]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=_MAX_TOKENS[how]))
    return [_parse(how, out.text) for out in outs]


def expansions(llm: Any, question: str, how: str) -> list[str]:
    """The extra queries (or, for hyde, the hypothetical passage) the LLM writes for ``question``."""
    return expand_many(llm, [question], how)[0]


def expanded_ranking(
    index: Any, question: str, k: int, mode: str, llm: Any, how: str, extra: list[str] | None = None
) -> list[tuple[int, float]]:
    """RRF over the question's own ranking and the rankings of its LLM expansions (``extra``: expansions
    written beforehand, e.g. by one batched :func:`expand_many`; else the LLM writes them now)."""
    depth = max(k, 50)
    rankings = [[i for i, _ in index.ranking(question, depth, mode)]]
    for text in expansions(llm, question, how) if extra is None else extra:
        if how == "hyde":
            vector = index.embedder.embed([text])[0]
            rankings.append([i for i, _ in index.dense_ranking(vector, depth)])
        else:
            rankings.append([i for i, _ in index.ranking(text, depth, mode)])
    return rrf_fuse(rankings)[:k]
