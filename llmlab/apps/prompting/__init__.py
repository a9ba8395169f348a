"""Prompting techniques over :class:`llmlab.LLM`: chat-template messages, few-shot (seeded random or
embedding-similar exemplars), zero-/few-shot chain of thought, self-consistency (majority vote with its
margin) and schema-constrained JSON output through the server's decoder; ``llmlab prompt`` and its eval.
"""

from llmlab.apps.prompting.ask import answer_key, ask
from llmlab.apps.prompting.builders import (
    COT_TRIGGER,
    TECHNIQUES,
    Exemplar,
    Prompt,
    build,
    few_shot,
    messages,
    zero_shot,
    zero_shot_cot,
)
from llmlab.apps.prompting.consistency import Vote, majority_vote, parse_number
from llmlab.apps.prompting.evaluate import evaluate_json, evaluate_prompting, format_cells
from llmlab.apps.prompting.exemplars import ExemplarSelector, gsm8k_pool, suite_pool
from llmlab.apps.prompting.structured import JsonReply, generate_json, parse_json_reply, read_schema

__all__ = [
    "COT_TRIGGER",
    "TECHNIQUES",
    "Exemplar",
    "ExemplarSelector",
    "JsonReply",
    "Prompt",
    "Vote",
    "answer_key",
    "ask",
    "build",
    "evaluate_json",
    "evaluate_prompting",
    "few_shot",
    "format_cells",
    "generate_json",
    "gsm8k_pool",
    "majority_vote",
    "messages",
    "parse_json_reply",
    "parse_number",
    "read_schema",
    "suite_pool",
    "zero_shot",
    "zero_shot_cot",
]
