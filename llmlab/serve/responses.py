"""OpenAI response bodies and SSE chunks from the engine's :class:`RequestOutput` snapshots.

With tools active, streamed content is held back from the first ``<tool_call>`` on (and any tail that could
still become one), so a client sees either plain content or ``delta.tool_calls``, never the raw block.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from llmlab.serve.openai_api import (
    PreparedRequest,
    chat_logprobs,
    completion_logprobs,
    engine_error,
    usage,
    visible_ids,
)
from llmlab.serve.tools import parse_tool_calls

_TAG = "<tool_call>"


def _finish_reason(out: Any, calls: list[Any]) -> str:
    return (
        "tool_calls" if calls else (out.finish_reason if out.finish_reason in ("stop", "length") else "stop")
    )


def _message(prepared: PreparedRequest, out: Any) -> tuple[dict[str, Any], list[Any]]:
    content, calls = out.text, []
    if prepared.tools_active:
        content, calls = parse_tool_calls(out.text, prepared.tools)
    message: dict[str, Any] = {"role": "assistant", "content": content if calls else out.text}
    if calls:
        message["tool_calls"] = calls
    return message, calls


def final_chat(prepared: PreparedRequest, finals: dict[int, Any]) -> dict[str, Any]:
    choices, completion_tokens = [], 0
    tok = prepared.model.tokenizer
    for index in sorted(finals):
        out = finals[index]
        message, calls = _message(prepared, out)
        completion_tokens += len(out.token_ids)
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": chat_logprobs(tok, visible_ids(out), out),
                "finish_reason": _finish_reason(out, calls),
            }
        )
    return {
        "id": prepared.request_id,
        "object": "chat.completion",
        "created": prepared.created,
        "model": prepared.model.name,
        "choices": choices,
        "usage": usage(sum(prepared.prompt_lengths), completion_tokens),
    }


def final_completion(prepared: PreparedRequest, finals: dict[int, Any]) -> dict[str, Any]:
    choices, completion_tokens = [], 0
    tok = prepared.model.tokenizer
    for index in sorted(finals):
        out = finals[index]
        completion_tokens += len(out.token_ids)
        choices.append(
            {
                "index": index,
                "text": out.text,
                "logprobs": completion_logprobs(tok, visible_ids(out), out),
                "finish_reason": _finish_reason(out, []),
            }
        )
    return {
        "id": prepared.request_id,
        "object": "text_completion",
        "created": prepared.created,
        "model": prepared.model.name,
        "choices": choices,
        "usage": usage(sum(prepared.prompt_lengths), completion_tokens),
    }


def _shown(text: str, tools_active: bool) -> str:
    """The part of ``text`` that may be streamed as content."""
    if not tools_active:
        return text
    cut = text.find(_TAG)
    if cut >= 0:
        return text[:cut]
    for k in range(min(len(_TAG) - 1, len(text)), 0, -1):
        if text.endswith(_TAG[:k]):
            return text[:-k]
    return text


def _error_chunk(exc: BaseException) -> dict[str, Any]:
    return engine_error(exc).body()


async def chat_stream(
    prepared: PreparedRequest, events: AsyncIterator[tuple[int, Any]], include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    tok = prepared.model.tokenizer
    head = {"id": prepared.request_id, "object": "chat.completion.chunk", "created": prepared.created}
    head["model"] = prepared.model.name
    n = len(prepared.prompts)
    for index in range(n):
        delta = {"role": "assistant", "content": ""}
        yield {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}
    sent_chars, sent_tokens, completion_tokens = [0] * n, [0] * n, 0
    async for index, out in events:
        if isinstance(out, Exception):
            yield _error_chunk(out)
            return
        ids = visible_ids(out) if out.finished else list(out.token_ids)
        shown = _shown(out.text, prepared.tools_active)
        choice: dict[str, Any] = {"index": index, "delta": {}, "logprobs": None, "finish_reason": None}
        if len(shown) > sent_chars[index]:
            choice["delta"]["content"] = shown[sent_chars[index] :]
            sent_chars[index] = len(shown)
        if out.logprobs is not None and len(ids) > sent_tokens[index]:
            choice["logprobs"] = chat_logprobs(tok, ids, out, sent_tokens[index])
        sent_tokens[index] = max(sent_tokens[index], len(ids))
        if out.finished:
            completion_tokens += len(out.token_ids)
            message, calls = _message(prepared, out)
            if calls:
                choice["delta"]["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
            elif len(out.text) > sent_chars[index]:  # held back but not a call after all
                choice["delta"]["content"] = (
                    choice["delta"].get("content", "") + out.text[sent_chars[index] :]
                )
            choice["finish_reason"] = _finish_reason(out, calls)
        if choice["delta"] or choice["finish_reason"] or choice["logprobs"]:
            yield {**head, "choices": [choice]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(sum(prepared.prompt_lengths), completion_tokens)}


async def completion_stream(
    prepared: PreparedRequest, events: AsyncIterator[tuple[int, Any]], include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    tok = prepared.model.tokenizer
    head = {"id": prepared.request_id, "object": "text_completion", "created": prepared.created}
    head["model"] = prepared.model.name
    n = len(prepared.prompts)
    sent_tokens, completion_tokens = [0] * n, 0
    async for index, out in events:
        if isinstance(out, Exception):
            yield _error_chunk(out)
            return
        ids = visible_ids(out) if out.finished else list(out.token_ids)
        logprobs = None
        if out.logprobs is not None and len(ids) > sent_tokens[index]:
            logprobs = completion_logprobs(tok, ids, out, sent_tokens[index])
        sent_tokens[index] = max(sent_tokens[index], len(ids))
        reason = _finish_reason(out, []) if out.finished else None
        if out.finished:
            completion_tokens += len(out.token_ids)
        if out.delta_text or reason or logprobs:
            choice = {"index": index, "text": out.delta_text, "logprobs": logprobs, "finish_reason": reason}
            yield {**head, "choices": [choice]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(sum(prepared.prompt_lengths), completion_tokens)}
