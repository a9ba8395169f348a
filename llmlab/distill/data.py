"""Distillation data: chat-rendered Alpaca conversations (the last ``heldout`` records never trained on), a
pretraining corpus cut into windows, and the teacher's own answers (token ids as the engine produced them)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmlab.data.corpora import load_corpus
from llmlab.errors import ConfigError
from llmlab.infer import LLM, SamplingParams
from llmlab.sft.chat import IGNORE_INDEX, TokenizedChat, prompt_ids
from llmlab.sft.datasets import Conversation, encode_conversations, load_conversations


def alpaca_split(heldout: int) -> tuple[list[Conversation], list[Conversation]]:
    """Shipped Alpaca conversations: (training records, the last ``heldout`` records)."""
    convs = load_conversations("alpaca")
    if heldout >= len(convs):
        raise ConfigError(f"'heldout' ({heldout}) must be smaller than the {len(convs)} Alpaca records")
    return convs[:-heldout], convs[-heldout:]


def heldout_prompts(n: int, heldout: int = 100) -> list[list[dict[str, str]]]:
    """The first ``n`` held-out Alpaca prompts as chat messages (the user turn, without the answer)."""
    _, held = alpaca_split(heldout)
    return [c.messages[:-1] for c in held[:n]]


def _all_tokens(ex: TokenizedChat) -> TokenizedChat:
    return TokenizedChat(list(ex.input_ids), list(ex.input_ids))


def chat_examples(
    tokenizer: Any, convs: Sequence[Conversation], max_len: int, kd_on: str
) -> list[TokenizedChat]:
    """Conversations in the teacher's chat template; labels mark the positions the KD loss counts."""
    examples = encode_conversations(tokenizer, convs, max_len, "right")
    return [_all_tokens(e) for e in examples] if kd_on == "all" else examples


def corpus_examples(tokenizer: Any, corpus: str, max_len: int, max_docs: int | None) -> list[TokenizedChat]:
    """A pretraining corpus cut into windows of ``max_len`` tokens (every token counts)."""
    docs = load_corpus(corpus)[:max_docs]
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    out = []
    for doc in docs:
        ids = tokenizer.encode(doc) + eos
        for s in range(0, len(ids) - 1, max_len):
            window = ids[s : s + max_len]
            if len(window) >= 2:
                out.append(TokenizedChat(window, list(window)))
    if not out:
        raise ConfigError(f"corpus {corpus!r}: no training windows")
    return out


def teacher_answers(
    teacher: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    max_tokens: int,
    temperature: float = 0.0,
    dtype: str = "fp32",
    batch: int = 32,
    seed: int = 0,
    cache: Path | None = None,
) -> tuple[list[dict[str, list[int]]], float]:
    """The teacher's answers to chat ``prompts``: ``[{"prompt": ids, "answer": ids}]`` and the seconds spent.

    Prompt and answer are the exact token ids the engine used (no re-tokenization), so the student sees the
    sequences the target produces. ``dtype="bf16"`` generates with a bf16 copy of the teacher: about twice
    as fast on a CPU with bf16 matmuls, and the answers are still the teacher's (most are token-identical to
    fp32 greedy ones; the rest part ways somewhere in the answer). Cached in ``cache`` (JSONL, first line the
    settings) so reruns and resumes do not generate again.
    """
    key = {"n": len(prompts), "tokens": max_tokens, "temperature": temperature, "dtype": dtype, "seed": seed}
    if cache is not None and cache.is_file():
        lines = cache.read_text(encoding="utf-8").splitlines()
        if lines and json.loads(lines[0]) == key:
            return [json.loads(line) for line in lines[1:]], 0.0
    ids = [prompt_ids(tokenizer, m) for m in prompts]
    params = [
        SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + i) for i in range(len(ids))
    ]
    model = copy.deepcopy(teacher).to(torch.bfloat16) if dtype == "bf16" else teacher
    llm = LLM.from_model(model, tokenizer, max_batch_size=batch)
    t0 = time.perf_counter()
    outs = llm.generate(ids, params, use_tqdm=True)
    seconds = time.perf_counter() - t0
    records = [{"prompt": p, "answer": list(o.token_ids)} for p, o in zip(ids, outs)]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(key)] + [json.dumps(r) for r in records]
        cache.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return records, seconds


def answer_examples(records: Sequence[dict[str, list[int]]], max_len: int, kd_on: str) -> list[TokenizedChat]:
    """Prompt + answer token ids as examples; with ``kd_on="assistant"`` only answer positions count."""
    out = []
    for r in records:
        ids = (r["prompt"] + r["answer"])[:max_len]
        labels = list(ids) if kd_on == "all" else [IGNORE_INDEX] * len(r["prompt"]) + r["answer"]
        if len(ids) >= 2 and any(x != IGNORE_INDEX for x in labels[1 : len(ids)]):
            out.append(TokenizedChat(ids, labels[: len(ids)]))
    return out
