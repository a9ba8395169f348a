"""Log-likelihoods of continuations, as lm-evaluation-harness computes them, scored as prefix trees.

lm-eval's request is ``(context, continuation)``: trailing spaces of the context move to the continuation,
``whole = encode(context + continuation)``, ``ctx = encode(context)``, ``cont = whole[len(ctx):]``, and the
score is ``sum_t log p(cont_t | ctx, cont_<t)`` (plus whether every ``cont_t`` is the argmax). The model
sees ``(ctx + cont)[-(L+1):][:-1]`` for a context of ``L`` tokens (left truncation).

The choices of one question share their context. :func:`score_groups` packs a question into ONE row of
a batch: the tokens the choices share (their longest common prefix), then each choice's own tokens, each
branch restarting its positions where the shared part ends and attending only to the shared part and to
itself (a tree mask passed through the model's KV-cache hook). The context is computed once instead of
once per choice, and the vocabulary projection runs only where a continuation token is predicted. The
numbers equal scoring each request on its own (up to float summation order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.model.transformer import AttnMeta, Transformer

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens (lm-eval's ``tok_encode`` for causal models adds no BOS)."""
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "plain_backend"):
        return tokenizer.encode_batch(texts)
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_requests(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[Request]:
    """lm-eval's ``_encode_pair`` for a list of ``(context, continuation)`` strings."""
    contexts, wholes = [], []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        contexts.append(context)
        wholes.append(context + continuation)
    enc = encode_texts(tokenizer, contexts + wholes)
    ctx_enc, whole_enc = enc[: len(pairs)], enc[len(pairs) :]
    return [(c, w[len(c) :]) for c, w in zip(ctx_enc, whole_enc, strict=True)]


@dataclass
class _TreeRow:
    """One packed question: input ids/positions/segments and, per request, where its targets are predicted."""

    ids: list[int]
    positions: list[int]
    segments: list[int]  # 0 = shared prefix, k + 1 = branch of request k
    targets: list[tuple[list[int], list[int]]]  # per request: (predicting row indices, target ids)
    truncated: bool


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def build_tree(requests: list[Request], max_len: int) -> _TreeRow:
    """Pack the requests of one question into one row (see the module docstring)."""
    fulls = [ctx + cont for ctx, cont in requests]
    # Share at most the shortest context, so every branch keeps at least its continuation.
    shared = min(_common_prefix(fulls), min(len(ctx) for ctx, _ in requests))
    # The last token of each request is only a target, never an input (as in lm-eval).
    longest_branch = max(len(f) - 1 - shared for f in fulls)
    cut = max(0, shared + longest_branch - max_len)
    truncated = cut > 0
    if cut >= shared:  # the prefix alone cannot absorb the cut: branches are truncated too
        cut_branch = cut - shared
        shared_ids: list[int] = []
    else:
        cut_branch = 0
        shared_ids = fulls[0][cut:shared]
    ids = list(shared_ids)
    positions = list(range(len(shared_ids)))
    segments = [0] * len(shared_ids)
    targets = []
    for k, (full, (_ctx, cont)) in enumerate(zip(fulls, requests, strict=True)):
        branch = full[shared:-1]
        drop = max(0, cut_branch - (longest_branch - len(branch)))  # lm-eval cuts each request on its own
        branch = branch[drop:]
        start = len(ids)
        ids.extend(branch)
        positions.extend(range(len(shared_ids), len(shared_ids) + len(branch)))
        segments.extend([k + 1] * len(branch))
        # Input token j (path index) predicts path token j + 1; path = shared_ids + branch (+ last target).
        path_rows = list(range(len(shared_ids))) + list(range(start, start + len(branch)))
        # A continuation longer than the whole context keeps only the tokens it can still predict.
        n_scored = min(len(cont), len(path_rows))
        targets.append((path_rows[len(path_rows) - n_scored :], list(cont[len(cont) - n_scored :])))
    return _TreeRow(ids, positions, segments, targets, truncated)


class _TreeMask:
    """A stand-in KV cache whose ``prepare`` hands the model the tree's positions and mask (no caching)."""

    def __init__(self, meta: AttnMeta):
        self.meta = meta

    def prepare(self, num_new: int, cfg: Any) -> AttnMeta:
        return self.meta

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v

    def advance(self, num_new: int) -> None:
        pass


def tree_meta(
    rows: list[_TreeRow], device: torch.device, sliding_window: int | None = None
) -> tuple[Tensor, AttnMeta]:
    """Padded ``input_ids [B, T]`` and the attention metadata of a batch of tree rows."""
    T = max(len(r.ids) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.ids)
        ids[b, :n] = torch.tensor(r.ids)
        pos[b, :n] = torch.tensor(r.positions)
        seg[b, :n] = torch.tensor(r.segments)
    idx = torch.arange(T)
    order = (idx[None, :, None] >= idx[None, None, :]) & (pos[:, :, None] >= pos[:, None, :])
    same = (seg[:, None, :] == 0) | (seg[:, :, None] == seg[:, None, :])
    valid = (seg[:, :, None] >= 0) & (seg[:, None, :] >= 0)
    mask = order & same & valid
    if sliding_window is not None:
        mask &= (pos[:, :, None] - pos[:, None, :]) < sliding_window
    mask |= torch.eye(T, dtype=torch.bool)[None]  # padding attends to itself (no all-masked rows)
    return ids.to(device), AttnMeta(q_pos=pos.to(device), mask=mask[:, None].to(device), is_causal=False)


def _tree_forward(model: Transformer, rows: list[_TreeRow]) -> list[list[tuple[float, bool]]]:
    device = next(model.parameters()).device
    ids, meta = tree_meta(rows, device, model.cfg.sliding_window)
    hidden = model(ids, cache=_TreeMask(meta), return_hidden=True)
    # Project only the positions that predict a continuation token.
    flat_rows, flat_targets, spans = [], [], []
    for b, r in enumerate(rows):
        per = []
        for pred_rows, cont in r.targets:
            per.append((len(flat_rows), len(cont)))
            flat_rows.extend(b * ids.shape[1] + i for i in pred_rows)
            flat_targets.extend(cont)
        spans.append(per)
    h = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(flat_rows, device=device)]
    logp = F.log_softmax(model.logits(h).float(), dim=-1)
    targets = torch.tensor(flat_targets, device=device)
    token_lp = logp.gather(-1, targets[:, None])[:, 0].cpu()
    greedy = (logp.argmax(-1) == targets).cpu()
    return [
        [(float(token_lp[s : s + n].sum()), bool(greedy[s : s + n].all())) for s, n in per] for per in spans
    ]


def _plain_forward(model: nn.Module, requests: list[Request], max_len: int) -> list[tuple[float, bool]]:
    """lm-eval's own way, one padded row per request (any causal LM returning logits, e.g. transformers)."""
    device = next(model.parameters()).device
    inputs = [(ctx + cont)[-(max_len + 1) :][:-1] for ctx, cont in requests]
    T = max(len(x) for x in inputs)
    ids = torch.zeros(len(inputs), T, dtype=torch.long)
    attn = torch.zeros(len(inputs), T, dtype=torch.long)
    for b, x in enumerate(inputs):  # right padding: positions of the real tokens are unchanged
        ids[b, : len(x)] = torch.tensor(x)
        attn[b, : len(x)] = 1
    out = model(ids.to(device), attention_mask=attn.to(device))
    logits = out.logits if hasattr(out, "logits") else out
    results = []
    for b, (x, (_, cont)) in enumerate(zip(inputs, requests, strict=True)):
        n = min(len(cont), len(x))  # a continuation longer than the context: score what can be predicted
        lp = F.log_softmax(logits[b, len(x) - n : len(x)].float(), dim=-1)
        t = torch.tensor(cont[len(cont) - n :], device=lp.device)
        results.append((float(lp.gather(-1, t[:, None]).sum()), bool((lp.argmax(-1) == t).all())))
    return results


def model_max_len(model: nn.Module, default: int = 2048) -> int:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    for key in ("max_seq_len", "max_position_embeddings"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return default


@torch.inference_mode()
def score_groups(
    model: nn.Module,
    groups: list[list[Request]],
    batch_size: int = 16,
    max_len: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[list[tuple[float, bool]]], dict[str, float]]:
    """``(log-likelihood, is_greedy)`` of every request, grouped as given (one group = one question).

    An llmlab :class:`Transformer` scores each group as one prefix tree; any other model (a transformers
    model) one padded row per request, as lm-eval does. ``batch_size`` is groups per forward.
    Returns the scores and ``{"truncated": groups whose prompt was cut from the left, "seconds": ...}``.
    """
    max_len = max_len or model_max_len(model)
    tree = isinstance(model, Transformer) and model.cfg.position != "alibi"
    was_training = model.training
    model.eval()
    results: list[list[tuple[float, bool]] | None] = [None] * len(groups)
    truncated = 0
    t0 = time.perf_counter()
    rows = [build_tree(g, max_len) for g in groups] if tree else None
    sizes = [len(r.ids) for r in rows] if rows else [sum(len(c) + len(t) for c, t in g) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: -sizes[i])  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        if rows is not None:
            batch_rows = [rows[i] for i in chunk]
            truncated += sum(r.truncated for r in batch_rows)
            for i, res in zip(chunk, _tree_forward(model, batch_rows), strict=True):
                results[i] = res
        else:
            flat = [req for i in chunk for req in groups[i]]
            truncated += sum(any(len(c) + len(t) > max_len + 1 for c, t in groups[i]) for i in chunk)
            scores = _plain_forward(model, flat, max_len)
            pos = 0
            for i in chunk:
                results[i] = scores[pos : pos + len(groups[i])]
                pos += len(groups[i])
        if on_batch is not None:
            on_batch(sum(len(groups[i]) for i in chunk))
    if was_training:
        model.train()
    done = [r for r in results if r is not None]
    return done, {"truncated": truncated, "seconds": time.perf_counter() - t0}
