"""Long-context evaluation: per-position perplexity and passkey retrieval, for any llmlab model.

**Per-position loss** (:func:`per_position_loss`): the mean next-token cross-entropy at each position
``t`` of non-overlapping windows of a long token stream,

    loss(t) = mean_w -log p(x[w, t + 1] | x[w, 0..t])

A model that uses its context gets lower loss further in; a model run past the positions it was trained on
(RoPE extrapolation) gets a loss that climbs there instead. Bucketed into ``n_buckets`` equal ranges.

**Passkey retrieval** (:func:`make_passkey_sample`, :func:`passkey_accuracy`): a random number is hidden at a
controlled depth in repetitive filler text, and the prompt ends with "What is the pass key? The pass key
is". The model retrieves it when greedy decoding would write the key's tokens. That is scored in one forward
pass with teacher forcing: greedy decoding emits the answer ``a_1..a_k`` exactly when, for every ``i``,
``argmax p(. | prompt, a_<i) == a_i``; no generation loop is needed. (The key is scored in the tokenization
the tokenizer gives " 71432"; a model that would spell the same digits with other tokens counts as wrong.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import ConfigError, DataError
from llmlab.model.transformer import Transformer
from llmlab.train.distributed import model_device

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
PREAMBLE = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it."


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


# --------------------------------------------------------------------------------- per-position loss
def per_position_loss(
    model: nn.Module,
    tokens: np.ndarray | Sequence[int],
    seq_len: int,
    max_windows: int = 16,
    batch_size: int = 4,
) -> np.ndarray:
    """Mean cross-entropy (nats) at each of ``seq_len`` positions over non-overlapping windows of ``tokens``."""
    tokens = np.asarray(tokens)
    n_windows = min(max_windows, (len(tokens) - 1) // seq_len)
    if n_windows < 1:
        raise DataError(f"per-position loss: {len(tokens)} tokens hold no window of {seq_len + 1}")
    device = model_device(model)
    sums = torch.zeros(seq_len, dtype=torch.float64)
    was = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, n_windows, batch_size):
            idx = range(start, min(start + batch_size, n_windows))
            rows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1].astype(np.int64) for i in idx])
            data = torch.from_numpy(rows).to(device)
            logits = _logits(model, data[:, :-1]).float()
            loss = F.cross_entropy(logits.transpose(1, 2), data[:, 1:], reduction="none")  # [B, T]
            sums += loss.sum(0).double().cpu()
    model.train(was)
    return (sums / n_windows).numpy()


def bucket_losses(losses: np.ndarray, n_buckets: int = 8) -> list[dict[str, float]]:
    """``[{"start", "end", "loss", "ppl"}]`` over ``n_buckets`` equal position ranges of ``losses``."""
    edges = np.linspace(0, len(losses), n_buckets + 1).astype(int)
    out = []
    for a, b in zip(edges, edges[1:]):
        if b > a:
            mean = float(losses[a:b].mean())
            out.append({"start": int(a), "end": int(b), "loss": mean, "ppl": math.exp(min(mean, 50.0))})
    return out


# ------------------------------------------------------------------------------------------ passkey
@dataclass
class PasskeySample:
    prompt_ids: list[int]  # preamble + filler with the needle at ``depth`` + question
    answer_ids: list[int]  # the key as the tokenizer spells " 71432"
    key: str
    depth: float  # where the needle starts, as a fraction of the filler
    needle_start: int  # token index of the needle in ``prompt_ids``


def make_passkey_sample(
    tokenizer, length: int, depth: float, rng: random.Random, digits: int = 5
) -> PasskeySample:
    """A prompt of exactly ``length`` tokens with a ``digits``-digit key hidden at ``depth`` (0 = start of the
    filler, 1 = its end).

    The filler is whole :data:`FILLER` sentences, so the needle and the question always follow a full stop
    (cutting the filler at a token count left fragments such as "... The sky is blue. The What is the pass
    key?" and "The The pass key is"); the length is made exact by dropping the first tokens of the first
    sentence, right after the preamble, far from both. The needle goes to the sentence boundary nearest
    ``depth``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"passkey depth must be in [0, 1], got {depth}")
    key = str(rng.randrange(10 ** (digits - 1), 10**digits))

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, split_special_tokens=True)

    head, needle, question = enc(PREAMBLE), enc(NEEDLE.format(key=key)), enc(QUESTION)
    n_filler = length - len(head) - len(needle) - len(question)
    if n_filler < 1:
        raise ConfigError(f"passkey length {length} is too short for the needle and question")
    sentences = [enc(" " + part.strip() + ".") for part in FILLER.split(".") if part.strip()]
    filler: list[int] = []
    ends: list[int] = []  # token offsets where a sentence ends, counted from the end of the filler
    while len(filler) < n_filler:
        filler = sentences[(-1 - len(ends)) % len(sentences)] + filler  # backwards from the question
        ends.append(len(filler))
    filler = filler[len(filler) - n_filler :]
    boundaries = sorted({0, n_filler, *(n_filler - e for e in ends if e <= n_filler)})
    cut = min(boundaries, key=lambda b: abs(b - depth * n_filler))
    prompt = head + filler[:cut] + needle + filler[cut:] + question
    return PasskeySample(prompt, enc(" " + key), key, depth, len(head) + cut)


def passkey_retrieved(model: nn.Module, sample: PasskeySample) -> tuple[bool, float]:
    """(greedy decoding would write the key, the fraction of the key's tokens that are the argmax)."""
    ids = torch.tensor([sample.prompt_ids + sample.answer_ids[:-1]], device=model_device(model))
    first, n = len(sample.prompt_ids) - 1, len(sample.answer_ids)
    with torch.no_grad():
        if isinstance(model, Transformer):  # the head only where the key is read: no [T, vocab] logits at 8k+
            logits = model.logits(model(ids, return_hidden=True)[:, first : first + n])[0]
        else:
            logits = _logits(model, ids)[0, first : first + n]
    predicted = logits.argmax(-1).tolist()
    hits = [p == a for p, a in zip(predicted, sample.answer_ids)]
    return all(hits), sum(hits) / len(hits)


def passkey_accuracy(
    model: nn.Module,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples_per_cell: int = 4,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Passkey accuracy for every (length, depth): ``[{"length", "depth", "accuracy", "token_accuracy"}]``."""
    rng = random.Random(seed)
    was = model.training
    model.eval()
    rows = []
    for length in lengths:
        for depth in depths:
            results = [
                passkey_retrieved(model, make_passkey_sample(tokenizer, length, depth, rng))
                for _ in range(samples_per_cell)
            ]
            rows.append(
                {
                    "length": length,
                    "depth": depth,
                    "accuracy": sum(ok for ok, _ in results) / len(results),
                    "token_accuracy": sum(t for _, t in results) / len(results),
                }
            )
    model.train(was)
    return rows


def format_passkey_table(rows: list[dict[str, float]]) -> str:
    """A length x depth table: key accuracy, and in brackets the share of key tokens that were the argmax."""
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    cell = {(r["length"], r["depth"]): r for r in rows}
    lines = ["| length | " + " | ".join(f"depth {d:g}" for d in depths) + " |"]
    lines.append("|---" * (len(depths) + 1) + "|")
    for n in lengths:
        cells = [cell[(n, d)] for d in depths]
        lines.append(
            f"| {n} | "
            + " | ".join(f"{100 * c['accuracy']:.0f}% ({100 * c['token_accuracy']:.0f}%)" for c in cells)
            + " |"
        )
    return "\n".join(lines)
