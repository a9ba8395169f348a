"""Chat messages for the template, tool definitions in the prompt, and ``<tool_call>`` parsing.

Tools use the Hermes/Qwen2.5 convention, which ChatML models (ours, SmolLM2) can be prompted with:

- the tool list goes in the system message as ``<tools>...</tools>`` (JSON function signatures) with the
  instruction to answer with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
- an assistant turn that called tools is rendered with those blocks as its content;
- a ``tool`` message becomes a user turn ``<tool_response>...</tool_response>`` (llmlab's ChatML template
  knows only system/user/assistant, and most ChatML models were trained this way).

The server parses ``<tool_call>`` blocks out of the generated text into ``message.tool_calls``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from llmlab.serve.protocol import APIError, ChatMessage, Tool

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

_TOOLS_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def content_text(message: ChatMessage) -> str:
    """A message's text (content parts joined; images and other parts are refused)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


def template_messages(messages: list[ChatMessage], tools: list[Tool] | None) -> list[dict[str, str]]:
    """OpenAI chat messages -> ``{"role", "content"}`` dicts for the chat template (see the module doc)."""
    out: list[dict[str, str]] = []
    for message in messages:
        role, text = message.role, content_text(message)
        if role == "developer":
            role = "system"
        if role == "tool":
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
        elif role == "assistant" and message.tool_calls:
            calls = [
                f'<tool_call>\n{{"name": {json.dumps(c.function.name)}, "arguments": {c.function.arguments}}}'
                "\n</tool_call>"
                for c in message.tool_calls
            ]
            text = "\n".join([text, *calls]) if text else "\n".join(calls)
        out.append({"role": role, "content": text})
    if tools:
        signatures = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
        prompt = _TOOLS_PROMPT.format(tools=signatures)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def parse_tool_calls(text: str, tools: list[Tool]) -> tuple[str | None, list[dict[str, Any]]]:
    """Split generated text into (remaining content or None, OpenAI ``tool_calls``).

    Only well-formed blocks naming a known function become calls; anything else stays content.
    """
    known = {t.function.name for t in tools}
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    cursor = 0
    for match in TOOL_CALL_RE.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or call.get("name") not in known:
            continue
        args = call.get("arguments", {})
        kept.append(text[cursor : match.start()])
        cursor = match.end()
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
        )
    kept.append(text[cursor:])
    content = "".join(kept).strip()
    return (content or None), calls


def selected_functions(tools: list[Tool], tool_choice: Any) -> list[dict[str, Any]]:
    """The functions a ``required`` or named ``tool_choice`` constrains the output to."""
    functions = [t.function.model_dump(exclude_none=True) for t in tools]
    if tool_choice == "required":
        return functions
    name = tool_choice.function.name
    chosen = [f for f in functions if f["name"] == name]
    if not chosen:
        raise APIError(f"tool_choice names function {name!r}, which is not in 'tools'", param="tool_choice")
    return chosen
