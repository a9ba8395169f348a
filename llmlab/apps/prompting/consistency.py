"""Answer parsing and self-consistency's majority vote (Wang et al. 2023).

Self-consistency samples N reasoning paths for one question, parses each one's final answer, and returns
the most frequent answer. With ``c_1 >= c_2 >= ...`` the vote counts of the distinct parsed answers over the
N samples (a sample whose answer cannot be parsed votes for nothing),

    answer = argmax_a c_a            (ties: the answer that reached the top count first in sample order)
    margin = (c_1 - c_2) / N         (c_2 = 0 with a single distinct answer; 0 when nothing parsed)

so the margin is 1 for a unanimous vote and 0 for a tie: a confidence to abstain or escalate on.

Parsing reuses the eval harness's: the last number of the text (lm-eval's ``flexible-extract``), normalized
to a float key so ``"8"``, ``"8.0"`` and ``"$8"`` vote together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from llmlab.eval.metrics import INVALID, extract_flexible, to_number


def parse_number(text: str) -> str | None:
    """The final numeric answer of a completion as a canonical key (``"72.0"``), or None."""
    found = extract_flexible(text)
    if found == INVALID:
        return None
    value = to_number(found)
    return None if value is None else repr(float(round(value, 6)))


@dataclass(frozen=True)
class Vote:
    """A majority vote: the winner (None when nothing parsed), its count, the margin and all counts."""

    answer: str | None
    count: int
    n: int
    margin: float
    counts: dict[str, int] = field(default_factory=dict)


def majority_vote(answers: Sequence[str | None]) -> Vote:
    """Majority vote over parsed answers (None abstains); see the module docstring for the margin."""
    counts: dict[str, int] = {}
    leader: str | None = None
    for answer in answers:
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        if leader is None or counts[answer] > counts[leader]:  # strictly more: earlier leader keeps a tie
            leader = answer
    n = len(answers)
    if leader is None:
        return Vote(None, 0, n, 0.0, {})
    ranked = sorted(counts.values(), reverse=True)
    runner_up = ranked[1] if len(ranked) > 1 else 0
    return Vote(leader, counts[leader], n, (ranked[0] - runner_up) / n, counts)
