"""OpenAI request -> engine inputs (prompt ids, ``SamplingParams``) and engine outputs -> OpenAI responses.

Pure translation, no I/O: :mod:`llmlab.serve.app` runs these around the engine thread. Everything that
can be wrong with a request is found here, before it is queued, and raised as an :class:`APIError` (400)
naming the parameter: unknown model, prompt longer than the context, bad sampling values, a JSON schema
or tool list the grammar compiler rejects.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmlab.errors import LLMLabError
from llmlab.infer import SamplingParams
from llmlab.infer import constrained as grammar
from llmlab.infer.chat import chat_stop_ids
from llmlab.serve.engine_thread import ServerShuttingDown
from llmlab.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
    SamplingFields,
)
from llmlab.serve.tools import selected_functions, template_messages

log = logging.getLogger("llmlab.serve")


@dataclass
class ServedModel:
    """One model name the server answers to: an engine (a base model, or the base with one adapter)."""

    name: str
    llm: Any
    root: str
    parent: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    @property
    def max_model_len(self) -> int | None:
        return self.llm.max_model_len

    @property
    def stop_ids(self) -> list[int]:
        return sorted(set(chat_stop_ids(self.tokenizer)) | set(self.llm.stop_ids))


@dataclass
class PreparedRequest:
    """What the engine thread needs for one API request: ``n`` sub-requests with their params."""

    model: ServedModel
    prompts: list[tuple[str, list[int], SamplingParams]]  # (request id, prompt ids, params)
    prompt_lengths: list[int]
    request_id: str
    created: int
    tools_active: bool = False
    tools: list[Any] | None = None


def engine_error(exc: BaseException) -> APIError:
    """An exception from the engine thread as an API error (a bad request: 400; anything else: 500)."""
    if isinstance(exc, LLMLabError):
        return APIError(str(exc), 400)
    if isinstance(exc, ServerShuttingDown):
        return APIError(str(exc), 503, code="server_shutting_down")
    log.error("request failed in the engine: %r", exc)
    return APIError("internal error while generating", 500, code="internal_error")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(
    body: SamplingFields,
    model: ServedModel,
    prompt_len: int,
    max_tokens: int | None,
    *,
    chat: bool,
    logprobs: bool,
    top_logprobs: int,
    processors: list[Any] | None,
    seed_offset: int,
) -> SamplingParams:
    """The engine's parameters for one choice; ``max_tokens`` defaults to, and is capped by, the context."""
    room = (model.max_model_len - prompt_len) if model.max_model_len is not None else None
    if max_tokens is None:
        max_tokens = room if room is not None else 256
    elif room is not None:
        max_tokens = min(max_tokens, room)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return SamplingParams(
            temperature=_temperature(body.temperature),
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),  # vLLM's -1 and 0 both mean "off"
            min_p=body.min_p or 0.0,
            max_tokens=max(1, max_tokens),
            seed=None if body.seed is None else body.seed + seed_offset,
            stop=[s for s in stop if s] or None,
            stop_token_ids=model.stop_ids if chat and not body.ignore_eos else None,
            ignore_eos=body.ignore_eos,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            logits_processors=processors,
        )
    except LLMLabError as exc:
        raise APIError(str(exc), param=_param_of(str(exc))) from exc


def _temperature(value: float | None) -> float:
    """OpenAI's default is 1; a positive value below 1e-5 is greedy, as in vLLM (logits / ~0 overflow)."""
    if value is None:
        return 1.0
    return 0.0 if value < _SAMPLING_EPS else value


_SAMPLING_EPS = 1e-5


def _param_of(message: str) -> str | None:
    parts = message.split("'")
    return parts[1] if len(parts) > 2 else None


def check_length(ids: list[int], model: ServedModel, param: str) -> None:
    if not ids:
        raise APIError("the prompt is empty", param=param)
    if model.max_model_len is not None and len(ids) >= model.max_model_len:
        raise APIError(
            f"this model's maximum context length is {model.max_model_len} tokens; the prompt has {len(ids)} "
            "tokens and must leave room for at least one new token",
            param=param,
            code="context_length_exceeded",
        )
    bad = [t for t in ids if not 0 <= t < model.llm.vocab_size]
    if bad:
        raise APIError(
            f"token id {bad[0]} is outside the vocabulary (size {model.llm.vocab_size})", param=param
        )


def _format_grammar(fmt: ResponseFormat | None) -> str | None:
    if fmt is None or fmt.type == "text":
        return None
    try:
        if fmt.type == "json_object":
            return grammar.json_object_grammar()
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError("response_format json_schema needs 'json_schema.schema'", param="response_format")
        return grammar.json_schema_grammar(fmt.json_schema.schema_)
    except LLMLabError as exc:
        raise APIError(str(exc), param="response_format") from exc


def _constraints(text_grammar: str | None, model: ServedModel, count: int, param: str) -> list[Any]:
    """One fresh constraint per choice (each holds its own parse state); [] without a grammar."""
    if text_grammar is None:
        return [None] * count
    try:
        return [
            [grammar.make_constraint(text_grammar, model.tokenizer, model.llm.vocab_size, model.stop_ids)]
            for _ in range(count)
        ]
    except LLMLabError as exc:
        raise APIError(str(exc), param=param) from exc


def prepare_chat(body: ChatCompletionRequest, model: ServedModel) -> PreparedRequest:
    tool_choice = body.tool_choice or ("auto" if body.tools else "none")
    tools_active = bool(body.tools) and tool_choice != "none"
    if tool_choice != "none" and not body.tools and body.tool_choice is not None:
        raise APIError("tool_choice needs a non-empty 'tools' list", param="tool_choice")
    messages = template_messages(body.messages, body.tools if tools_active else None)
    try:
        _, ids = model.llm.encode_prompt(messages)
    except LLMLabError as exc:
        raise APIError(str(exc), param="messages") from exc
    check_length(ids, model, "messages")
    text_grammar = _format_grammar(body.response_format)
    if tools_active and tool_choice != "auto":
        if text_grammar is not None:
            raise APIError(
                "response_format cannot be combined with a forced tool_choice", param="tool_choice"
            )
        try:
            text_grammar = grammar.tool_call_grammar(selected_functions(body.tools, tool_choice))
        except LLMLabError as exc:
            raise APIError(str(exc), param="tools") from exc
    processors = _constraints(text_grammar, model, body.n, "tools" if tools_active else "response_format")
    rid = new_id("chatcmpl")
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    prompts = [
        (
            f"{rid}-{i}",
            ids,
            sampling_params(
                body,
                model,
                len(ids),
                max_tokens,
                chat=True,
                logprobs=body.logprobs,
                top_logprobs=top,
                processors=processors[i],
                seed_offset=i,
            ),
        )  # fmt: skip
        for i in range(body.n)
    ]
    return PreparedRequest(model, prompts, [len(ids)], rid, int(time.time()), tools_active, body.tools)


def prepare_completion(body: CompletionRequest, model: ServedModel) -> PreparedRequest:
    if body.echo:
        raise APIError("echo is not supported", param="echo")
    prompt = body.prompt
    if isinstance(prompt, str):
        batch: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        batch = [prompt]
    else:
        batch = list(prompt)
    if len(batch) * body.n > 64:
        raise APIError("at most 64 prompts x n choices per request", param="prompt")
    encoded = []
    for p in batch:
        ids = model.tokenizer.encode(p) if isinstance(p, str) else list(p)
        check_length(ids, model, "prompt")
        encoded.append(ids)
    text_grammar = _format_grammar(body.response_format)
    rid = new_id("cmpl")
    top = body.logprobs or 0
    prompts = []
    for pi, ids in enumerate(encoded):
        processors = _constraints(text_grammar, model, body.n, "response_format")
        for i in range(body.n):
            params = sampling_params(
                body, model, len(ids), body.max_tokens, chat=False, logprobs=body.logprobs is not None,
                top_logprobs=top, processors=processors[i], seed_offset=i,
            )  # fmt: skip
            prompts.append((f"{rid}-{pi * body.n + i}", ids, params))
    return PreparedRequest(model, prompts, [len(ids) for ids in encoded], rid, int(time.time()))


# ---------------------------------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token_entry(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    text = tokenizer.decode([token])
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def _finite(x: float) -> float:
    return max(float(x), -9999.0)  # JSON has no -inf; OpenAI reports -9999.0 for impossible tokens


def chat_logprobs(tokenizer: Any, token_ids: list[int], out: Any, start: int = 0) -> dict[str, Any] | None:
    """``choice.logprobs`` for tokens ``token_ids[start:]`` of ``out`` (None when not requested)."""
    if out.logprobs is None:
        return None
    content = []
    for k in range(start, min(len(token_ids), len(out.logprobs))):
        entry = _token_entry(tokenizer, token_ids[k], out.logprobs[k])
        tops = out.top_logprobs[k] if out.top_logprobs else {}
        entry["top_logprobs"] = [_token_entry(tokenizer, t, lp) for t, lp in tops.items()]
        content.append(entry)
    return {"content": content}


def completion_logprobs(
    tokenizer: Any, token_ids: list[int], out: Any, start: int = 0
) -> dict[str, Any] | None:
    """Legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset."""
    if out.logprobs is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    offset = 0
    for k in range(start, min(len(token_ids), len(out.logprobs))):
        text = tokenizer.decode([token_ids[k]])
        tokens.append(text)
        lps.append(_finite(out.logprobs[k]))
        top = out.top_logprobs[k] if out.top_logprobs else {}
        tops.append({tokenizer.decode([t]): _finite(lp) for t, lp in top.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def visible_ids(out: Any) -> list[int]:
    """Generated ids without a final stop token (the text never shows it)."""
    ids = list(out.token_ids)
    if (
        out.finish_reason == "stop"
        and isinstance(out.stop_reason, int)
        and ids
        and ids[-1] == out.stop_reason
    ):
        ids = ids[:-1]
    return ids
