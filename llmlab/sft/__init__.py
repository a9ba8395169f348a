"""Supervised fine-tuning: chat templates and assistant-only masks (:mod:`.chat`), data loading and batching
(:mod:`.datasets`), and the run itself (:mod:`.recipe`, ``llmlab sft``)."""

from llmlab.sft.chat import CHATML_TEMPLATE, TokenizedChat, prompt_ids, render, tokenize_chat
from llmlab.sft.datasets import SFTBatchSource, encode_conversations, load_conversations

__all__ = [
    "CHATML_TEMPLATE",
    "SFTBatchSource",
    "TokenizedChat",
    "encode_conversations",
    "load_conversations",
    "prompt_ids",
    "render",
    "tokenize_chat",
]
