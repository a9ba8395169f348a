"""Sliding-window perplexity and bits per byte (the strided evaluation of Hugging Face's perplexity guide).

The text is tokenized once and cut into windows of ``seq_len`` tokens that start every ``stride`` tokens.
Each window scores only the tokens no earlier window scored, so with ``stride < seq_len`` every scored
token sees at least ``seq_len - stride`` tokens of context (better, slower estimates; ``stride = seq_len``
gives disjoint windows, where the first token of each window is not scored at all).

Bits per byte divides the total negative log-likelihood (in bits) by the UTF-8 bytes of the scored text,
so it compares models with different tokenizers and compressors such as gzip (see NOTES.md).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.errors import ConfigError, DataError


def window_plan(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` for each window: tokens ``[first_scored, end)`` are scored in it.

    ``first_scored >= begin + 1`` because the window's first token has no context inside the window.
    """
    plan = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        first = max(prev_end, begin + 1)
        if end - begin >= 2 and first < end:
            plan.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return plan


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out  # llmlab Transformer or a transformers model


def _decoded_bytes(tokenizer: Any, ids: list[int]) -> int:
    try:
        text = tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
        text = tokenizer.decode(ids)
    return len(text.encode("utf-8"))


@torch.inference_mode()
def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    token_ids: list[int] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Perplexity of ``model`` on ``text`` (or pre-tokenized ``token_ids``).

    Args:
        seq_len: window length in tokens (at most the model's context).
        stride: tokens between window starts (default ``seq_len``: disjoint windows).
        max_tokens: evaluate only the first ``max_tokens`` tokens of the text.
        batch_size: windows per forward pass.

    Returns a dict with ``ppl``, ``nll`` (mean nats per scored token), ``bits_per_byte``, ``tokens``
    (scored), ``bytes`` (of the scored text), ``windows``, ``seq_len``, ``stride``, ``seconds`` and
    ``tokens_per_s``.
    """
    from tqdm import tqdm

    stride = seq_len if stride is None else stride
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if not 0 < stride <= seq_len:
        raise ConfigError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "position", None) == "learned" and seq_len > cfg.max_seq_len:
        raise ConfigError(f"seq_len {seq_len} is longer than the model's position table ({cfg.max_seq_len})")
    if token_ids is None:
        if text is None:
            raise ConfigError("evaluate_perplexity needs text or token_ids")
        token_ids = tokenizer.encode(text)
    ids = list(token_ids[:max_tokens] if max_tokens is not None else token_ids)
    if len(ids) < 2:
        raise DataError(f"perplexity needs at least 2 tokens of text, got {len(ids)}")

    plan = window_plan(len(ids), seq_len, stride)
    device = next(model.parameters(), torch.empty(0)).device
    all_ids = torch.tensor(ids, dtype=torch.long)
    was_training = model.training
    model.eval()
    nll_sum, scored = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=sum(e - f for _, e, f in plan), desc="perplexity", unit="tok", disable=not progress)
    # Windows of equal length go through the model together.
    i = 0
    while i < len(plan):
        length = plan[i][1] - plan[i][0]
        j = i
        while j < len(plan) and j - i < batch_size and plan[j][1] - plan[j][0] == length:
            j += 1
        batch = plan[i:j]
        inputs = torch.stack([all_ids[b:e] for b, e, _ in batch]).to(device)
        logits = _logits(model, inputs)
        for row, (b, e, first) in enumerate(batch):
            # Logit at position t predicts token t + 1.
            pred = logits[row, first - b - 1 : e - b - 1].float()
            target = inputs[row, first - b : e - b]
            nll_sum += float(F.cross_entropy(pred, target, reduction="sum"))
            scored += e - first
            bar.update(e - first)
        bar.set_postfix(ppl=f"{math.exp(nll_sum / max(scored, 1)):.3f}")
        i = j
    bar.close()
    if was_training:
        model.train()
    seconds = time.perf_counter() - t0
    n_bytes = sum(_decoded_bytes(tokenizer, ids[first:e]) for _, e, first in plan)
    nll = nll_sum / scored
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "bits_per_byte": nll_sum / math.log(2) / max(n_bytes, 1),
        "tokens": scored,
        "bytes": n_bytes,
        "windows": len(plan),
        "seq_len": seq_len,
        "stride": stride,
        "seconds": seconds,
        "tokens_per_s": scored / seconds if seconds > 0 else float("inf"),
    }
