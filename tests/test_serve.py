"""`llmlab serve`: the official openai client and raw httpx against a real server on a loopback port.

The server runs a tiny random model (byte-level tokenizer, ChatML), so every call is fast; greedy results
are compared with the same model driven through ``llmlab.LLM`` directly.
"""

from __future__ import annotations

import json
import re
import time

import _infer_helpers as H
import httpx
import openai
import pytest

from llmlab.infer import LLM, SamplingParams
from llmlab.infer.chat import chat_stop_ids
from llmlab.serve.openai_api import ServedModel
from llmlab.serve.server import BackgroundServer, startup_lines

one_thread = pytest.fixture(scope="module", autouse=True)(H.one_thread)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def tiny_llm(**options) -> LLM:
    return LLM.from_model(H.model(max_seq_len=1024), H.tokenizer(), enable_prefix_caching=True, **options)


@pytest.fixture(scope="module")
def server():
    with BackgroundServer([ServedModel("tiny", tiny_llm(), root="tiny")]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference() -> LLM:
    return tiny_llm()


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{re.escape(name)}{{[^}}]*{re.escape(labels)}[^}}]*}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_models_list_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server + "/health").json() == {"status": "ok"}


def test_chat_greedy_equals_engine(client, reference):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    want = reference.generate(
        [msgs], SamplingParams(max_tokens=12, stop_token_ids=chat_stop_ids(reference.tokenizer))
    )[0]
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_matches_plain(client):
    msgs = [{"role": "user", "content": "Once upon a time"}]
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=15, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=msgs,
            max_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_equal_engine_with_logprobs(client, reference):
    prompts = ["First Citizen:", "Once upon a time"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0, logprobs=2)
    want = reference.generate(prompts, SamplingParams(max_tokens=8, logprobs=True, top_logprobs=2))
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [w.text for w in want]
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(want[0].token_ids)
    assert lp.token_logprobs == pytest.approx(want[0].logprobs, abs=1e-4)
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)  # distinct byte tokens may decode alike
    streamed = client.completions.create(
        model="tiny", prompt=prompts[0], max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == want[0].text


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


def test_n_choices_seeded(client):
    kw = dict(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=1.0, seed=7
    )
    a = client.chat.completions.create(n=2, **kw)
    b = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_response_format_json_schema(client):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": ["ann", "bob"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "A person as JSON"}], max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )  # fmt: skip
    data = json.loads(r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop"
    assert set(data) == {"name", "age"} and data["name"] in ("ann", "bob") and 0 <= data["age"] <= 99


def test_tool_call_round_trip(client):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(
        model="tiny", messages=msgs, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome", "Oslo")
    named = client.chat.completions.create(
        model="tiny", messages=msgs, tools=[WEATHER], max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    msgs += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})},
    ]
    final = client.chat.completions.create(
        model="tiny", messages=msgs, tools=[WEATHER], tool_choice="none", max_tokens=10, temperature=0
    )
    assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason in (
        "stop",
        "length",
    )
    streamed = client.chat.completions.create(
        model="tiny", messages=msgs[:1], tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0,
        stream=True,
    )  # fmt: skip
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""  # the raw <tool_call> block is never shown
    assert [d.tool_calls[0].function.name for d in deltas if d.tool_calls] == ["get_weather"]


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 7}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 1000}, 400, "n"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "model"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
            400,
            "response_format",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400, "tool_choice"),
    ],
)
def test_bad_chat_bodies_get_openai_errors(server, body, status, param):
    r = httpx.post(server + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_malformed_json_too_long_and_too_big(server):
    r = httpx.post(
        server + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server + "/v1/completions", json={"prompt": "speak " * 1200, "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert re.search(r"1024 tokens; the prompt has \d+ tokens", r.json()["error"]["message"])
    r = httpx.post(server + "/v1/completions", json={"prompt": [5, 6, 99999]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/completions", json={"prompt": "x" * (5 * 2**20)})
    assert r.status_code == 413 and r.json()["error"]["message"]


def test_max_tokens_capped_by_context(client):
    r = client.completions.create(
        model="tiny", prompt=[7] * 1020, max_tokens=500, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


def test_tokenize_detokenize(server):
    ids = httpx.post(server + "/tokenize", json={"prompt": "Once upon a time"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 1024
    assert httpx.post(server + "/detokenize", json={"tokens": ids["tokens"]}).json() == {
        "prompt": "Once upon a time"
    }
    chat = httpx.post(server + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > ids["count"] / 4


def test_disconnect_aborts_and_frees_blocks(server):
    body = {"prompt": "Once upon a time", "max_tokens": 900, "stream": True, "ignore_eos": True}
    aborted = metric(server, "llmlab:request_success_total", 'finished_reason="abort"')
    with httpx.stream("POST", server + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert metric(server, "llmlab:kv_cache_blocks_used") > 0
    deadline = time.monotonic() + 10
    while metric(server, "llmlab:kv_cache_blocks_used") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "llmlab:kv_cache_blocks_used") == 0
    assert metric(server, "llmlab:request_success_total", 'finished_reason="abort"') == aborted + 1
    assert metric(server, "llmlab:generation_tokens_total") < 900 + 2000  # it did not run to the end


def test_metrics_names(server):
    text = httpx.get(server + "/metrics").text
    for name in [
        "llmlab:num_requests_running", "llmlab:num_requests_waiting", "llmlab:kv_cache_usage_perc",
        "llmlab:prefix_cache_hit_rate", "llmlab:prompt_tokens_total", "llmlab:generation_tokens_total",
        "llmlab:time_to_first_token_seconds_bucket", "llmlab:time_per_output_token_seconds_bucket",
        "llmlab:e2e_request_latency_seconds_bucket", "llmlab:request_success_total", "llmlab:http_requests_total",
    ]:  # fmt: skip
        assert name in text, name


def test_api_key_queue_limit_and_startup_log():
    llm = tiny_llm()
    with BackgroundServer([ServedModel("tiny", llm, root="tiny")], api_key="s3cret", max_pending=1) as url:
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        body = {"prompt": "Once", "max_tokens": 900, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth) as first:
            lines = (
                first.iter_lines()
            )  # (a generator over iter_lines() would close the stream when collected)
            assert next(lines).startswith("data:")
            r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
    lines = startup_lines([ServedModel("tiny", llm, root="tiny")], "0.0.0.0", 8000, None)
    assert lines[0].startswith("llmlab serve: http://0.0.0.0:8000/v1")
    assert re.search(r"KV cache \d+ tokens", lines[1]) and "API key: none" in lines[2]
    assert lines[-1].startswith("WARNING")
    assert not startup_lines([ServedModel("t", llm, root="t")], "127.0.0.1", 1, "k")[-1].startswith("WARNING")


def test_non_streaming_client_that_leaves_is_aborted_too(server):
    aborted = metric(server, "llmlab:request_success_total", 'finished_reason="abort"')
    body = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while metric(server, "llmlab:request_success_total", 'finished_reason="abort"') == aborted:
        assert time.monotonic() < deadline, "the abandoned request was not aborted"
        time.sleep(0.05)
    assert metric(server, "llmlab:kv_cache_blocks_used") == 0
