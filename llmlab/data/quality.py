"""Model-based quality filtering: drop the documents a reference language model finds least likely.

CCNet (Wenzek et al. 2019) scores every document with a KenLM model trained on Wikipedia and keeps the
documents whose perplexity falls in the best percentiles. Here the reference model is any llmlab model (a
tiny one trained on clean text is enough to separate prose from boilerplate, tables and foreign text):

    ppl(d) = exp( -1/N * sum_{t=1..N} log p(x_t | x_<t) )

over the first ``N <= max_tokens`` tokens of document ``d``, and :func:`worst_fraction` names the
``drop_frac`` of documents with the highest perplexity. The cleaning stage (``perplexity_model`` and
``perplexity_drop_frac`` in :class:`~llmlab.data.clean.CleanConfig`) drops them and lists the worst in
its report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llmlab.errors import ConfigError
from llmlab.loading import load


def document_perplexity(nll_sum: float, n_tokens: int) -> float:
    """``exp(nll_sum / n_tokens)``; ``inf`` for a document with no token to predict."""
    return math.exp(min(nll_sum / n_tokens, 700.0)) if n_tokens > 0 else math.inf


def perplexities(
    model, tokenizer, texts: Sequence[str], max_tokens: int = 256, batch_size: int = 16
) -> list[float]:
    """The reference model's perplexity of each text (first ``max_tokens`` + 1 tokens, fp32, no gradients)."""
    limit = min(max_tokens, getattr(getattr(model, "cfg", None), "max_seq_len", max_tokens))
    ids = [tokenizer.encode(t, split_special_tokens=True)[: limit + 1] for t in texts]
    scores = [math.inf] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))  # similar lengths share a batch
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = [i for i in order[start : start + batch_size] if len(ids[i]) >= 2]
            if not chunk:
                continue
            width = max(len(ids[i]) for i in chunk)
            rows = torch.full((len(chunk), width), -100, dtype=torch.long)
            for r, i in enumerate(chunk):
                rows[r, : len(ids[i])] = torch.tensor(ids[i])
            rows = rows.to(device)
            logits = model(rows[:, :-1].clamp(min=0)).float()
            nll = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], ignore_index=-100, reduction="none")
            for r, i in enumerate(chunk):
                scores[i] = document_perplexity(float(nll[r].sum()), len(ids[i]) - 1)
    model.train(was)
    return scores


def worst_fraction(scores: Sequence[float], drop_frac: float) -> list[int]:
    """Indices of the ``round(drop_frac * n)`` highest scores, worst first."""
    if not 0.0 <= drop_frac < 1.0:
        raise ConfigError(f"config key 'perplexity_drop_frac' must be in [0, 1), got {drop_frac}")
    n_drop = round(drop_frac * len(scores))
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:n_drop]


def perplexity_filter(
    texts: Sequence[str], model_path: str, drop_frac: float
) -> tuple[list[int], list[float]]:
    """(indices to drop, worst first; every text's perplexity) with the llmlab model at ``model_path``."""
    model, tokenizer = load(model_path)
    if tokenizer is None:
        raise ConfigError(f"config key 'perplexity_model': {model_path} has no tokenizer to score text with")
    scores = perplexities(model, tokenizer, texts)
    return worst_fraction(scores, drop_frac), scores
