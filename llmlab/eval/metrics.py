"""Metric functions as lm-evaluation-harness defines them (pure functions on scores; no model here).

- ``acc``: ``argmax_i ll_i == gold`` with ``ll_i = sum_t log p(cont_i,t | ctx, cont_i,<t)``;
- ``acc_norm``: ``argmax_i ll_i / len(choice_i) == gold``, the length in characters of the choice string
  (lm-eval 0.4's ``completion_len = len(choice)``; ``acc_bytes`` would divide by UTF-8 bytes);
- TruthfulQA MC2: ``sum_{i true} p_i / sum_i p_i`` with ``p_i = exp(ll_i)``;
- stderr of a mean: ``sqrt(sum (x - mean)^2 / (n - 1)) / sqrt(n)`` (lm-eval's ``mean_stderr``);
- pass@k (Chen et al. 2021, unbiased): ``1 - C(n - c, k) / C(n, k)`` for ``c`` correct of ``n`` samples;
- Wilson score interval of a proportion ``p = k / n``:
  ``(p + z^2/2n ± z sqrt(p(1 - p)/n + z^2/4n^2)) / (1 + z^2/n)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np


def mc_scores(lls: Sequence[float], choices: Sequence[str], gold: int, n_true: int | None = None) -> dict:
    """Per-question metrics: ``acc``, ``acc_norm`` (and ``mc2`` when ``n_true`` gives the true choices)."""
    ll = np.asarray(lls, dtype=np.float64)
    lengths = np.asarray([float(len(c)) for c in choices])
    out = {"acc": float(int(np.argmax(ll)) == gold), "acc_norm": float(int(np.argmax(ll / lengths)) == gold)}
    if n_true is not None:
        p = np.exp(ll - ll.max())  # the same ratio as exp(ll) / sum exp(ll), without underflow
        out["mc2"] = float(p[:n_true].sum() / p.sum())
    return out


def mean_stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    x = np.asarray(values, dtype=np.float64)
    return float(x.std(ddof=1) / math.sqrt(n))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` of ``n`` samples correct (Chen et al. 2021, eq. 1)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# --------------------------------------------------------------------------------- answer extraction
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = [re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$")]
INVALID = "[invalid]"


def gsm8k_normalize(text: str) -> str:
    """lm-eval's gsm8k ``exact_match`` preprocessing: drop ``,``, ``$``, up to ``#### ``, a final ``.``; lower."""
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def extract_strict(text: str) -> str:
    """The first ``#### N`` (lm-eval's ``strict-match`` filter), else ``[invalid]``."""
    m = GSM8K_STRICT.search(text)
    return m.group(1).strip() if m else INVALID


def extract_flexible(text: str) -> str:
    """The last number-like match (lm-eval's ``flexible-extract``: ``group_select: -1``), else ``[invalid]``."""
    matches = GSM8K_FLEXIBLE.findall(text)
    if not matches:
        return INVALID
    last = matches[-1]
    found = next((g for g in last if g), INVALID) if isinstance(last, tuple) else last
    return found.strip()


def to_number(text: str) -> float | None:
    try:
        return float(gsm8k_normalize(text))
    except ValueError:
        return None


def numbers_equal(pred: str, target: str, rel: float = 1e-4) -> bool:
    a, b = to_number(pred), to_number(target)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)


_LETTER = re.compile(r"\(([A-E])\)|\b(?:answer|option|choice)(?: is)?:?\s*\(?([A-E])\b|\b([A-E])\b")


def extract_letter(text: str) -> str:
    """The last answer letter A-E in ``(C)``, ``answer is C`` or a lone ``C``, else ``[invalid]``."""
    found = [next(g for g in m if g) for m in _LETTER.findall(text)]
    return found[-1] if found else INVALID


def wilson_interval(wins: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``wins / n`` (``(0, 1)`` when ``n == 0``: nothing is known).

    Used for every accuracy and win rate the project reports: unlike ``p ± z·stderr`` it stays inside [0, 1]
    and is honest at 0/n and n/n, which small-n runs hit often."""
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
