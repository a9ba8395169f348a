"""Mixing data sources: replay of an old domain during training, and weighted corpus mixtures.

**Replay** (:class:`ReplayLoader`): continual pre-training on a new domain forgets the old one; mixing a
fraction ``f`` of old-domain windows into every batch is the standard remedy. Global row ``n`` of the run
(row ``j`` of global batch ``k`` is ``n = k * G + j``) is a replay row exactly when

    floor((n + 1) * f) > floor(n * f)

so after ``N`` rows exactly ``floor(N * f)`` came from the replay set: the fraction is realized to within one
row at every point of the run, with no state beyond the batch index (resumable, world-size independent).

**Corpus mixtures** (:func:`mixture_targets`): ``data prepare`` with several corpora and weights by tokens.
With temperature ``T`` the weights are ``w_i ** (1/T)`` renormalised (``T = 1``: as given; ``T > 1``
flattens towards uniform, as multilingual models do to upsample small languages); with ``weights`` omitted
they start from each corpus' natural size (tokens), so ``T`` alone gives the temperature sampling of XLM/mT5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.data.loader import open_split
from llmlab.errors import ConfigError, DataError


def is_replay_row(n: int, fraction: float) -> bool:
    """Whether global row ``n`` is a replay row (see the module docstring)."""
    return math.floor((n + 1) * fraction) > math.floor(n * fraction)


@dataclass
class ReplayLoader:
    """Packed windows from ``directory`` with a ``fraction`` of the rows drawn from ``replay_directory``.

    Same contract as :class:`~llmlab.data.loader.PackedLoader` (``batch_size`` per rank, batch ``k`` a pure
    function of ``(seed, k)``); each batch also carries ``replay_rows`` (how many of this rank's rows are
    replay) so the realized fraction can be checked.
    """

    directory: str | Path
    replay_directory: str | Path
    fraction: float
    split: str
    batch_size: int
    seq_len: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    step: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(f"data config: 'replay_fraction' must be in [0, 1), got {self.fraction}")
        self.tokens = open_split(self.directory, self.split)
        self.replay_tokens = open_split(self.replay_directory, self.split)
        for path, toks in ((self.directory, self.tokens), (self.replay_directory, self.replay_tokens)):
            if len(toks) < self.seq_len + 2:
                raise DataError(
                    f"{Path(path) / (self.split + '.bin')}: only {len(toks)} tokens, "
                    f"fewer than one sequence of {self.seq_len + 1}"
                )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _rows(self, step: int) -> list[tuple[np.memmap, int]]:
        """(token array, window offset) of every row of global batch ``step``."""
        g = self.global_batch
        replay = [is_replay_row(step * g + j, self.fraction) for j in range(g)]
        n_replay = sum(replay)
        rng = np.random.default_rng([self.seed, step])
        main_off = iter(rng.integers(0, len(self.tokens) - self.seq_len - 1, size=g - n_replay))
        rng_r = np.random.default_rng([self.seed, step, 1])
        replay_off = iter(rng_r.integers(0, len(self.replay_tokens) - self.seq_len - 1, size=n_replay))
        return [
            (self.replay_tokens, int(next(replay_off))) if r else (self.tokens, int(next(main_off)))
            for r in replay
        ]

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = self._rows(self.step)[self.rank :: self.world_size]
        self.step += 1
        data = torch.from_numpy(
            np.stack([toks[o : o + self.seq_len + 1].astype(np.int64) for toks, o in rows])
        )
        n_replay = sum(1 for toks, _ in rows if toks is self.replay_tokens)
        return {"input_ids": data[:, :-1], "labels": data[:, 1:], "replay_rows": torch.tensor(n_replay)}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.seed = int(state.get("seed", self.seed))


# ----------------------------------------------------------------------------------- corpus mixtures
def parse_mixture(specs: Sequence[str]) -> list[tuple[str, float | None]]:
    """``["tinystories:0.7", "gutenberg:0.3"]`` -> ``[("tinystories", 0.7), ("gutenberg", 0.3)]``.

    A spec without ``:weight`` gets None (its natural size). A corpus named twice is an error naming it.
    """
    out: list[tuple[str, float | None]] = []
    seen: set[str] = set()
    for spec in specs:
        name, sep, weight = spec.rpartition(":") if ":" in spec else (spec, "", "")
        if not sep:
            name = spec
        if not name:
            raise ConfigError(f"corpus mixture entry {spec!r}: empty corpus name")
        if name in seen:
            raise ConfigError(f"corpus mixture: corpus '{name}' is named twice")
        seen.add(name)
        if sep:
            try:
                value: float | None = float(weight)
            except ValueError:
                raise ConfigError(
                    f"corpus mixture entry {spec!r}: weight {weight!r} is not a number"
                ) from None
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"corpus mixture entry {spec!r}: weight must be a finite number >= 0")
        else:
            value = None
        out.append((name, value))
    return out


def mixture_targets(
    sizes: Sequence[float], weights: Sequence[float | None] | None = None, temperature: float = 1.0
) -> list[float]:
    """Target shares of each corpus: ``weights`` (None entries: the corpus' share of ``sizes``), tempered by
    ``temperature`` (``p_i ∝ w_i ** (1 / T)``) and normalised to sum to 1."""
    if temperature <= 0:
        raise ConfigError(f"corpus mixture: temperature must be > 0, got {temperature}")
    total_size = float(sum(sizes))
    if weights is None:
        weights = [None] * len(sizes)
    base = [s / total_size if w is None else float(w) for w, s in zip(weights, sizes)]
    if not sum(base) > 0:
        raise ConfigError(f"corpus mixture: weights {list(weights)} must sum to a positive number")
    tempered = [b ** (1.0 / temperature) if b > 0 else 0.0 for b in base]
    norm = sum(tempered)
    return [t / norm for t in tempered]


def sample_mixture(
    token_counts: Sequence[Sequence[int]], targets: Sequence[float], seed: int = 0
) -> tuple[list[list[int]], dict[str, Any]]:
    """Which documents of each corpus to take so that the token shares match ``targets``.

    ``token_counts[i][d]`` is the token count of document ``d`` of corpus ``i``. The mixture is as large as it
    can be without repeating any document: the corpus with the fewest tokens per unit of target is used whole,
    the others contribute a random subset of documents (so a share can only be met up to one document).
    Returns per corpus the chosen document indices and a summary of the realized mixture.
    """
    sizes = [sum(c) for c in token_counts]
    active = [i for i, t in enumerate(targets) if t > 0]
    if not active:
        raise ConfigError("corpus mixture: every weight is zero")
    total = min(sizes[i] / targets[i] for i in active)
    rng = np.random.default_rng(seed)
    picks: list[list[int]] = []
    for i, counts in enumerate(token_counts):
        want = targets[i] * total
        chosen: list[int] = []
        got = 0
        while got < want and counts:
            for d in rng.permutation(len(counts)):
                if got >= want:
                    break
                chosen.append(int(d))
                got += counts[d]
        picks.append(chosen)
    realized_tokens = [sum(token_counts[i][d] for d in p) for i, p in enumerate(picks)]
    grand = sum(realized_tokens) or 1
    summary = {
        "target": list(targets),
        "realized": [t / grand for t in realized_tokens],
        "tokens": realized_tokens,
        "documents": [len(p) for p in picks],
        "epochs": [t / s if s else 0.0 for t, s in zip(realized_tokens, sizes)],
    }
    return picks, summary


def prepare_mixture(
    specs: Sequence[str],
    tokenizer: Any,
    out_dir: str | Path,
    temperature: float = 1.0,
    val_fraction: float = 0.1,
    seed: int = 0,
    clean: Any = True,
    chunk_chars: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``data prepare`` over a token-weighted mixture of corpora (``["tinystories:0.7", "gutenberg:0.3"]``).

    Each corpus is loaded and cleaned on its own, its documents are tokenized to count tokens, the documents
    of the mixture are chosen by :func:`sample_mixture` and shuffled together, and the result goes through
    :func:`~llmlab.data.prepare.prepare_dataset` (document-level train/val split, shards, tokenizer). The
    returned ``meta.json`` has a ``mixture`` entry with each corpus' target and realized token share.
    """
    from llmlab.data.clean import CleanConfig, clean_documents
    from llmlab.data.corpora import DEFAULT_CHUNK_CHARS, Document, load_documents
    from llmlab.data.prepare import prepare_dataset
    from llmlab.tokenizer import Tokenizer

    parsed = parse_mixture(specs)
    if not parsed:
        raise ConfigError("corpus mixture: no corpora given")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)
    clean_cfg = CleanConfig() if clean is True else (clean or None)
    per_corpus: list[list[Document]] = []
    counts: list[list[int]] = []
    cleaning: dict[str, Any] = {}
    for name, _ in parsed:
        docs = load_documents(name, chunk_chars or DEFAULT_CHUNK_CHARS)
        if clean_cfg is not None:
            result = clean_documents([d.text for d in docs], clean_cfg, progress=progress)
            docs = [Document(text, docs[i].source) for text, i in zip(result.texts, result.index)]
            cleaning[name] = {"docs_in": result.report.docs_in, "docs_out": result.report.docs_out}
            if not docs:
                raise DataError(f"corpus mixture: cleaning removed every document of '{name}'")
        per_corpus.append(docs)
        counts.append([len(ids) + 1 for ids in tok.encode_batch([d.text for d in docs], True)])
    targets = mixture_targets([sum(c) for c in counts], [w for _, w in parsed], temperature)
    picks, summary = sample_mixture(counts, targets, seed)
    chosen = [per_corpus[i][d] for i, p in enumerate(picks) for d in p]
    order = np.random.default_rng(seed).permutation(len(chosen))
    mixed = [chosen[j] for j in order]
    summary = {"corpora": [n for n, _ in parsed], "weights": [w for _, w in parsed], "temperature": temperature,
               **summary, "cleaning": cleaning}  # fmt: skip
    return prepare_dataset(
        mixed, tok, out_dir, val_fraction=val_fraction, seed=seed, clean=False, progress=progress,
        extra_meta={"mixture": summary},
    )  # fmt: skip


def format_mixture(meta_mixture: dict[str, Any]) -> str:
    """Lines ``corpus  target %  realized %  tokens  documents  epochs`` of a prepared mixture."""
    lines = ["corpus            target  realized      tokens  documents  share of corpus used"]
    m = meta_mixture
    for i, name in enumerate(m["corpora"]):
        lines.append(
            f"{name[:16]:<16}  {100 * m['target'][i]:5.1f}%   {100 * m['realized'][i]:5.1f}%  "
            f"{m['tokens'][i]:>10,}  {m['documents'][i]:>9,}  {100 * m['epochs'][i]:5.1f}%"
        )
    return "\n".join(lines)
