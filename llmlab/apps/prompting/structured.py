"""Structured JSON output through the server's constrained decoder (:mod:`llmlab.infer.constrained`).

The grammar is the one ``response_format={"type": "json_schema", ...}`` compiles on the server
(:func:`~llmlab.infer.constrained.json_schema_grammar`), applied per request as a logits processor
(:func:`~llmlab.infer.constrained.make_constraint`, one per sample: each holds its own parse state). Without
the constraint the same prompt is sampled freely and the reply parsed as it comes (the first ``{...}``
span, as a lenient client would), so the two parse-failure rates compare like for like.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmlab.errors import ConfigError
from llmlab.infer import LLM, SamplingParams
from llmlab.infer import constrained as grammar
from llmlab.infer.chat import chat_stop_ids

_OBJECT = re.compile(r"\{.*\}", re.S)


@dataclass(frozen=True)
class JsonReply:
    """A reply, its parsed JSON value (None if it did not parse), why not, and its generated token count."""

    text: str
    value: Any
    error: str | None
    tokens: int
    finish_reason: str | None


def read_schema(path: str | Path) -> dict[str, Any]:
    """A JSON-schema file, checked by compiling it to the decoder's grammar (ConfigError naming the file)."""
    path = Path(path)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--json-schema {path}: cannot read it ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--json-schema {path}:{exc.lineno}: not JSON ({exc.msg})") from exc
    try:
        grammar.json_schema_grammar(schema)
    except Exception as exc:  # noqa: BLE001 - LLMLabError or llguidance's own: either is a bad file
        raise ConfigError(f"--json-schema {path}: {exc}") from exc
    return schema


def parse_json_reply(text: str) -> tuple[Any, str | None]:
    """``(value, None)`` for a reply holding a JSON value (whole, or its outermost ``{...}``), else
    ``(None, reason)``."""
    candidates = [text.strip()]
    found = _OBJECT.search(text)
    if found and found.group() != candidates[0]:
        candidates.append(found.group())
    last = "empty reply"
    for candidate in candidates:
        try:
            return json.loads(candidate), None
        except json.JSONDecodeError as exc:
            last = f"not JSON ({exc.msg} at char {exc.pos})"
    return None, last


def json_params(
    llm: LLM, schema: dict[str, Any] | None, base: SamplingParams, count: int = 1
) -> list[SamplingParams]:
    """``count`` copies of ``base`` ending at the chat stop ids, each with a fresh schema constraint
    (none when ``schema`` is None)."""
    stops = chat_stop_ids(llm.tokenizer)
    settings = {**base.to_dict(), "stop_token_ids": stops}
    if schema is None:
        return [SamplingParams(**settings) for _ in range(count)]
    compiled = grammar.json_schema_grammar(schema)
    return [
        SamplingParams(
            **settings,
            logits_processors=[grammar.make_constraint(compiled, llm.tokenizer, llm.vocab_size, stops)],
        )
        for _ in range(count)
    ]


def generate_json(
    llm: LLM,
    prompts: Sequence[Any],
    schema: dict[str, Any],
    constrained: bool = True,
    params: SamplingParams | None = None,
) -> list[JsonReply]:
    """One JSON reply per prompt (chat messages or engine prompts), batched in one ``LLM.generate`` call."""
    base = params or SamplingParams(max_tokens=128)
    plist = json_params(llm, schema if constrained else None, base, len(prompts))
    replies = []
    for out in llm.generate(list(prompts), plist):
        value, error = parse_json_reply(out.text)
        if error is not None and out.finish_reason == "length":
            error = f"cut at max_tokens ({error})"
        replies.append(JsonReply(out.text, value, error, len(out.token_ids), out.finish_reason))
    return replies
