"""Constrained decoding: token masks from a grammar (llguidance), applied by the engine's sampler.

A :class:`GrammarConstraint` is a ``SamplingParams.logits_processors`` entry. Each call it feeds the tokens
generated since the last call to an ``llguidance.LLMatcher``, asks it for the bitmask of tokens that keep
the output inside the grammar, and sets every other logit to ``-inf``. Once the grammar is complete only the
stop tokens stay allowed, so the request ends with ``finish_reason="stop"`` and its text parses.

Grammars come from llguidance's own compilers (no hand-written JSON grammar):

- :func:`json_object_grammar`: any JSON object (``response_format={"type": "json_object"}``);
- :func:`json_schema_grammar`: a JSON-schema-valid value (``{"type": "json_schema", ...}``);
- :func:`tool_call_grammar`: one ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` block whose
  name is one of the given functions and whose arguments validate against that function's schema.

llguidance needs the tokenizer's byte strings; it reads them from our :class:`~llmlab.tokenizer.Tokenizer`'s
Hugging Face ``tokenizer.json`` (``LLTokenizer`` built once per tokenizer and vocabulary size, ~ms).

Overhead per generated token (mask computation + application) is measured by :func:`measure_overhead`
(``python -m llmlab.infer.constrained MODEL``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import llguidance
import numpy as np
import torch

from llmlab.errors import LLMLabError
from llmlab.infer.chat import chat_stop_ids
from llmlab.infer.sampling import SamplingParams

_TOKENIZERS: dict[tuple[int, int], llguidance.LLTokenizer] = {}
# JSON spelled as ``json.dumps`` spells it (", " and ": "): the spacing models saw in training. Compact
# separators pushed them off their usual tokens: constrained values right 0/50 (tiny SFT model) and 10/20
# (SmolLM2) with them, 50/50 and 19/20 with these, as unconstrained (bench/prompting_eval.py's JSON task).
# No free whitespace, so a weak model cannot ramble.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def ll_tokenizer(tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer`` (cached): token bytes over the model's ``vocab_size`` rows, with
    ``stop_ids`` as the end-of-sequence tokens a finished grammar allows."""
    key = (id(tokenizer), vocab_size, *sorted(stop_ids))
    cached = _TOKENIZERS.get(key)
    if cached is None:
        backend = getattr(tokenizer, "backend", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise LLMLabError("constrained decoding needs a Hugging Face tokenizers-backed Tokenizer")
        cached = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=sorted(stop_ids))
        _TOKENIZERS[key] = cached
    return cached


def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    """Grammar of a value that validates against ``schema`` (compact JSON)."""
    if schema is True or schema == {}:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise LLMLabError("a JSON schema must be an object")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise LLMLabError(f"invalid JSON schema: {exc}") from exc


def json_object_grammar() -> str:
    """Grammar of any JSON object."""
    return json_schema_grammar({"type": "object"})


def tool_call_schema(functions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of one call: ``{"name": <one of the functions>, "arguments": <its parameters>}``."""
    if not functions:
        raise LLMLabError("a tool-call grammar needs at least one function")
    options = []
    for fn in functions:
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_call_grammar(functions: Sequence[dict[str, Any]]) -> str:
    """Grammar of one ``<tool_call>`` block (Hermes/Qwen format) calling one of ``functions``."""
    schema = json.dumps({**tool_call_schema(functions), "x-guidance": _JSON_OPTIONS})
    lark = f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {schema}\n'
    return llguidance.LLMatcher.grammar_from_lark(lark)


class GrammarConstraint:
    """A logits processor that keeps one request's output inside a grammar.

    Build one per request (it holds the parse state). Check :meth:`check` (or construct via
    :func:`make_constraint`) before queueing: an invalid grammar is a user error.
    """

    def __init__(self, grammar: str, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]):
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self.matcher = llguidance.LLMatcher(
            ll_tokenizer(tokenizer, vocab_size, stop_ids), grammar, log_level=0
        )
        self.consumed = 0
        self._bitmask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.mask_seconds = 0.0  # time spent in __call__ (the per-token overhead)
        self.calls = 0

    def check(self) -> None:
        if self.matcher.is_error():
            raise LLMLabError(f"invalid grammar: {self.matcher.get_error()}")

    def _sync(self, generated: Sequence[int]) -> None:
        """Feed the tokens sampled since the last call (roll back if the engine dropped some)."""
        if len(generated) < self.consumed:
            self.matcher.rollback(self.consumed - len(generated))
            self.consumed = len(generated)
        for token in generated[self.consumed :]:
            if not self.matcher.is_stopped():
                self.matcher.consume_token(int(token))
        self.consumed = len(generated)

    def allowed_numpy(self) -> np.ndarray:
        """Boolean mask over the vocabulary of the tokens the grammar allows next (numpy: one thread)."""
        if self.matcher.is_error() or self.matcher.is_stopped():
            allowed = np.zeros(self.vocab_size, dtype=bool)
            allowed[self.stop_ids] = True  # done (or broken): the only way on is to stop
            return allowed
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        # Bit k of 32-bit word j is token 32*j + k: little-endian bytes, little-endian bit order.
        return np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)

    def allowed(self) -> torch.Tensor:
        return torch.from_numpy(self.allowed_numpy().copy())

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        self._sync(generated)
        allowed = self.allowed_numpy()
        n = min(len(allowed), logits.shape[-1])
        if logits.device.type == "cpu" and logits.is_contiguous():
            # numpy, not torch: a 50k-element masked fill would wake torch's thread pool for a few µs of work,
            # which on a busy machine costs milliseconds of waiting.
            row = logits.numpy()
            row[:n][~allowed[:n]] = -np.inf
            row[n:] = -np.inf
        else:
            keep = torch.from_numpy(allowed[:n].copy()).to(logits.device)
            logits[:n].masked_fill_(~keep, float("-inf"))
            logits[n:] = float("-inf")
        self.mask_seconds += time.perf_counter() - start
        self.calls += 1
        return logits


def make_constraint(
    grammar: str, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]
) -> GrammarConstraint:
    """A checked :class:`GrammarConstraint` (raises :class:`LLMLabError` for a grammar llguidance rejects)."""
    constraint = GrammarConstraint(grammar, tokenizer, vocab_size, stop_ids)
    constraint.check()
    return constraint


def measure_overhead(llm: Any, prompt: Any, schema: dict[str, Any], repeats: int = 3) -> dict[str, Any]:
    """Per-token cost of the constraint: greedy generation under ``schema`` vs the same number of plain
    tokens (``ignore_eos``), after a warm-up, best of ``repeats``; plus the processor's own time per call."""
    stops = chat_stop_ids(llm.tokenizer)
    grammar = json_schema_grammar(schema)

    def constrained_run() -> tuple[float, Any, GrammarConstraint]:
        c = make_constraint(grammar, llm.tokenizer, llm.vocab_size, stops)
        params = SamplingParams(max_tokens=256, stop_token_ids=stops, logits_processors=[c])
        start = time.perf_counter()
        out = llm.generate([prompt], params)[0]
        return time.perf_counter() - start, out, c

    _, out, _ = constrained_run()  # warm-up (and the output length the plain runs match)
    plain_params = SamplingParams(max_tokens=len(out.token_ids), ignore_eos=True)
    plain_s, constrained_s, mask_s = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate([prompt], plain_params)
        plain_s.append(time.perf_counter() - start)
        seconds, out, c = constrained_run()
        constrained_s.append(seconds)
        mask_s.append(c.mask_seconds / max(1, c.calls))
    n = max(1, len(out.token_ids))
    return {
        "tokens": len(out.token_ids),
        "plain_ms_per_token": round(1e3 * min(plain_s) / n, 3),
        "constrained_ms_per_token": round(1e3 * min(constrained_s) / n, 3),
        "mask_ms_per_token": round(1e3 * min(mask_s), 3),
        "output": out.text,
    }


if __name__ == "__main__":  # python -m llmlab.infer.constrained [MODEL]: the per-token overhead
    import sys

    from llmlab.infer.llm import LLM  # the command line only: the engine is this module's user, not its base
    from llmlab.loading import resolve_model_path

    engine = LLM(resolve_model_path(sys.argv[1] if len(sys.argv) > 1 else "smollm2"))
    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"type": "string", "maxLength": 20},
        },
        "required": ["name", "age", "city"],
    }
    msgs = [{"role": "user", "content": "Describe a person as JSON with name, age and city."}]
    print(json.dumps(measure_overhead(engine, msgs, person), indent=2))
