"""Evaluation: benchmark tasks in lm-evaluation-harness's definitions (``evaluate``), reward-model win rates
(``winrate``), and perplexity / bits per byte (``evaluate_perplexity``).

Exports are lazy so ``llmlab.eval.cli`` (imported by ``llmlab --help``) does not pull in torch.
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

_LAZY = {
    "evaluate": "llmlab.eval.harness",
    "format_table": "llmlab.eval.harness",
    "winrate": "llmlab.eval.judging",
    "pairwise_accuracy": "llmlab.eval.judging",
    "pass_at_k": "llmlab.eval.metrics",
    "score_groups": "llmlab.eval.loglik",
    "encode_requests": "llmlab.eval.loglik",
    "run_program": "llmlab.eval.sandbox",
    "TASKS": "llmlab.eval.task_list",
    "evaluate_perplexity": "llmlab.eval.perplexity",
    "window_plan": "llmlab.eval.perplexity",
}

__getattr__ = lazy_exports("llmlab.eval", _LAZY)

__all__ = sorted(_LAZY)
