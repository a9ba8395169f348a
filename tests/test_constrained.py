"""Constrained decoding (llguidance masks as engine logits processors): JSON schema, JSON object, tool calls."""

from __future__ import annotations

import json

import _infer_helpers as H
import pytest
import torch

from llmlab.errors import LLMLabError
from llmlab.infer import LLM, SamplingParams
from llmlab.infer import constrained as C
from llmlab.serve.protocol import Tool
from llmlab.serve.tools import parse_tool_calls

one_thread = pytest.fixture(scope="module", autouse=True)(H.one_thread)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ann", "bob", "cy"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
VOCAB = 300  # the model's rows may exceed the tokenizer's vocabulary: those rows are masked too


def constraint(grammar: str) -> C.GrammarConstraint:
    tok = H.tokenizer()
    return C.make_constraint(grammar, tok, VOCAB, tok.stop_ids)


def sample(c: C.GrammarConstraint, seed: int, limit: int = 400) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < limit:
        logits = c(out, torch.randn(VOCAB, generator=g) * 3)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        out.append(token)
        if token in H.tokenizer().stop_ids:
            break
    return out


def check_person(data: dict) -> None:
    assert set(data) == {"name", "age", "tags"} and data["name"] in ("ann", "bob", "cy")
    assert isinstance(data["age"], int) and 0 <= data["age"] <= 120
    assert len(data["tags"]) <= 3 and all(isinstance(t, bool) for t in data["tags"])


def test_valid_json_tokens_are_allowed_and_only_stop_after_it():
    c = constraint(C.json_schema_grammar(PERSON))
    tok = H.tokenizer()
    text = json.dumps({"name": "bob", "age": 42, "tags": [True, False]})  # json.dumps's spacing
    ids = tok.encode(text)
    assert not c.allowed()[tok.encode("x")[0]]  # JSON cannot start with x
    for k, t in enumerate(ids):
        c(ids[:k], torch.zeros(VOCAB))
        assert c.allowed()[t], f"token {k} ({tok.decode([t])!r}) of a valid document was masked"
    row = c(ids, torch.zeros(VOCAB))
    assert sorted(torch.isfinite(row).nonzero().flatten().tolist()) == tok.stop_ids


@pytest.mark.parametrize("seed", range(4))
def test_random_logits_always_give_schema_valid_json(seed):
    tokens = sample(constraint(C.json_schema_grammar(PERSON)), seed)
    assert tokens[-1] in H.tokenizer().stop_ids
    check_person(json.loads(H.tokenizer().decode(tokens[:-1])))


def test_json_object_grammar_starts_an_object():
    c = constraint(C.json_object_grammar())
    allowed = c.allowed()
    tok = H.tokenizer()
    assert allowed[tok.encode("{")[0]] and not allowed[tok.encode("[")[0]] and not allowed[tok.encode("1")[0]]


@pytest.mark.parametrize("seed", range(3))
def test_tool_call_grammar_gives_a_parseable_valid_call(seed):
    tokens = sample(constraint(C.tool_call_grammar([WEATHER, {"name": "noop"}])), seed)
    text = H.tokenizer().decode(tokens[:-1])
    tools = [Tool(function=WEATHER), Tool(function={"name": "noop"})]
    content, calls = parse_tool_calls(text, tools)
    assert content is None and len(calls) == 1
    args = json.loads(calls[0]["function"]["arguments"])
    if calls[0]["function"]["name"] == "get_weather":
        assert args["city"] in ("Paris", "Rome") and set(args) <= {"city", "days"}


def test_bad_schema_is_a_user_error():
    with pytest.raises(LLMLabError, match="grammar|schema"):
        constraint(C.json_schema_grammar({"type": "no-such-type"}))
    with pytest.raises(LLMLabError):
        C.json_schema_grammar("not a schema")


def test_engine_applies_the_constraint_greedy_and_batched():
    llm = LLM.from_model(H.model(max_seq_len=512), H.tokenizer())
    tok = llm.tokenizer
    params = [
        SamplingParams(
            max_tokens=120,
            temperature=t,
            seed=s,
            logits_processors=[
                C.make_constraint(C.json_schema_grammar(PERSON), tok, llm.vocab_size, tok.stop_ids)
            ],
        )  # fmt: skip
        for t, s in [(0.0, None), (1.0, 1), (1.0, 2)]
    ]
    plain = SamplingParams(max_tokens=20)
    outs = llm.generate(["Once upon a time"] * 3 + ["First Citizen"], params + [plain])
    for out in outs[:3]:
        assert out.finish_reason == "stop"
        check_person(json.loads(out.text))
    assert not outs[3].text.startswith('{"name"')  # an unconstrained request in the same batch is untouched
    assert params[0].logits_processors[0].calls == len(outs[0].token_ids)
