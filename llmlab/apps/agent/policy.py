"""Where the agent's words come from: the engine in-process (:class:`EnginePolicy`) or an OpenAI-compatible
server (:class:`ServerPolicy`). Both take a batch of :class:`Request` and return one :class:`Completion` each.

The engine policy renders messages exactly as ``llmlab serve`` does (:func:`llmlab.serve.tools.template_messages`:
tool signatures in the system turn, ``<tool_call>`` blocks in assistant turns, ``tool`` results as
``<tool_response>`` user turns), parses calls with the server's :func:`~llmlab.serve.tools.parse_tool_calls`, and
for a constrained turn applies the server's tool-call grammar (:func:`llmlab.infer.constrained.tool_call_grammar`),
so every constrained turn is exactly one schema-valid call. Requests of a batch share one ``llm.generate``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmlab.errors import LLMLabError
from llmlab.infer import SamplingParams
from llmlab.infer import constrained as grammar
from llmlab.infer.chat import chat_stop_ids
from llmlab.serve.protocol import ChatMessage
from llmlab.serve.protocol import Tool as ToolSpec
from llmlab.serve.tools import parse_tool_calls, template_messages


@dataclass
class Request:
    messages: list[dict[str, Any]]  # OpenAI chat messages (tool_calls, tool role included)
    tools: list[dict[str, Any]] | None = None  # OpenAI ``tools`` entries
    constrained: bool = False  # force exactly one call of one of ``tools`` (grammar-constrained)
    max_tokens: int = 256
    stop: list[str] | None = None
    show_tools: bool = True  # tool signatures in the system turn (off for a model SFT'd on a fixed tool set)


@dataclass
class Completion:
    text: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI format, arguments a JSON string
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the request could not run (e.g. longer than the context)


class Policy(Protocol):
    max_context: int | None

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int: ...

    def complete(self, requests: list[Request]) -> list[Completion]: ...


def to_template(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """OpenAI messages + tools -> the ``{"role", "content"}`` list the chat template renders (server's code)."""
    specs = [ToolSpec.model_validate(t) for t in tools] if tools else None
    return template_messages([ChatMessage.model_validate(m) for m in messages], specs)


class EnginePolicy:
    """Drive an in-process :class:`llmlab.LLM` (greedy by default)."""

    def __init__(self, llm: Any, temperature: float = 0.0, seed: int | None = 0):
        self.llm = llm
        self.temperature = temperature
        self.seed = seed
        self.max_context: int | None = llm.max_model_len
        self.stop_ids = sorted(set(chat_stop_ids(llm.tokenizer)) | set(llm.stop_ids))
        self._grammars: dict[str, str] = {}

    def encode(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        return self.llm.encode_prompt(to_template(messages, tools))[1]

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
        return len(self.encode(messages, tools))

    def _constraint(self, tools: list[dict[str, Any]]) -> Any:
        functions = [t["function"] for t in tools]
        key = json.dumps(functions, sort_keys=True)
        if key not in self._grammars:
            self._grammars[key] = grammar.tool_call_grammar(functions)
        return grammar.make_constraint(
            self._grammars[key], self.llm.tokenizer, self.llm.vocab_size, self.stop_ids
        )

    def complete(self, requests: list[Request]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        prompts, params, where = [], [], []
        for i, req in enumerate(requests):
            ids = self.encode(req.messages, req.tools if req.show_tools else None)
            room = None if self.max_context is None else self.max_context - len(ids)
            if room is not None and room < 1:
                results[i] = Completion(
                    "",
                    prompt_tokens=len(ids),
                    error=f"the prompt has {len(ids)} tokens; the context is {self.max_context}",
                )
                continue
            processors = [self._constraint(req.tools)] if req.constrained and req.tools else None
            prompts.append(ids)
            params.append(
                SamplingParams(
                    temperature=self.temperature,
                    max_tokens=req.max_tokens if room is None else max(1, min(req.max_tokens, room)),
                    seed=self.seed,
                    stop=req.stop,
                    stop_token_ids=self.stop_ids,
                    logits_processors=processors,
                )
            )
            where.append(i)
        outs = self.llm.generate(prompts, params) if prompts else []
        for i, out in zip(where, outs, strict=True):
            req = requests[i]
            text, calls = out.text, []
            if req.tools:
                content, calls = parse_tool_calls(text, [ToolSpec.model_validate(t) for t in req.tools])
                text = text if not calls else (content or "")
            results[i] = Completion(text, calls, len(out.prompt_token_ids), len(out.token_ids))
        return [r for r in results if r is not None]


class ServerPolicy:
    """Drive an OpenAI-compatible ``/v1/chat/completions`` endpoint (``llmlab serve`` or any other).

    A constrained turn is sent as ``tool_choice="required"`` (``llmlab serve`` then applies its grammar).
    Token counts for fitting the context are estimated (4 characters a token) unless the server reports usage.
    """

    def __init__(self, url: str, model: str, max_context: int | None = 2048, timeout_s: float = 120.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.model = model
        self.max_context = max_context
        self.timeout_s = timeout_s

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
        return len(json.dumps(messages)) // 4 + len(json.dumps(tools or [])) // 4

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.url}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            return {"error": f"server answered HTTP {exc.code}: {detail}"}
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise LLMLabError(f"cannot reach the server at {self.url}: {exc}") from exc

    def complete(self, requests: list[Request]) -> list[Completion]:
        out = []
        for req in requests:
            body: dict[str, Any] = {
                "model": self.model,
                "messages": req.messages,
                "max_tokens": req.max_tokens,
                "temperature": 0,
            }
            if req.tools:
                body["tools"] = req.tools
                body["tool_choice"] = "required" if req.constrained else "auto"
            if req.stop:
                body["stop"] = req.stop
            data = self._post(body)
            if "error" in data:
                out.append(Completion("", error=str(data["error"])))
                continue
            message = data["choices"][0]["message"]
            usage = data.get("usage", {})
            out.append(
                Completion(
                    message.get("content") or "",
                    message.get("tool_calls") or [],
                    usage.get("prompt_tokens", 0),
                    usage.get("completion_tokens", 0),
                )
            )
        return out
