"""`llmlab serve` over checkpoints on disk: LoRA adapters as model names, prefix caching, the CLI's checks."""

from __future__ import annotations

import json
import re

import _infer_helpers as H
import httpx
import pytest
import torch
from _serve_helpers import Forced

from llmlab.cli import main
from llmlab.infer import LLM, SamplingParams
from llmlab.infer.chat import chat_stop_ids
from llmlab.model.checkpoint import save_checkpoint
from llmlab.model.lora import LoRAConfig, LoRALinear, apply_lora, save_adapter
from llmlab.serve.openai_api import ServedModel
from llmlab.serve.server import BackgroundServer, build_models

one_thread = pytest.fixture(scope="module", autouse=True)(H.one_thread)


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_checkpoint(root / "base", H.model(max_seq_len=512), H.tokenizer())
    tuned = H.model(max_seq_len=512)
    apply_lora(tuned, LoRAConfig(r=4, targets=["q", "v", "down"]))
    g = torch.Generator().manual_seed(3)
    for m in tuned.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.5)
    save_adapter(tuned, root / "adapter")
    return root / "base", root / "adapter"


def chat(url: str, model: str, messages: list[dict]) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": 10, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def counter(url: str, name: str, model: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(rf'^{name}{{model_name="{model}"}} (\S+)$', text, re.M).group(1))


def test_lora_adapter_is_its_own_model(base_and_adapter):
    base, adapter = base_and_adapter
    models = build_models(str(base), adapters={"tuned": str(adapter)}, max_batch_size=4, kv_cache_mb=8)
    msgs = [{"role": "user", "content": "Once upon a time"}]
    with BackgroundServer(models) as url:
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert ids == ["base", "tuned"]
        got_base, got_tuned = chat(url, "base", msgs), chat(url, "tuned", msgs)
    direct = LLM(base, adapter=str(adapter))
    params = SamplingParams(max_tokens=10, stop_token_ids=chat_stop_ids(direct.tokenizer))
    want = direct.generate([msgs], params)[0].text
    assert got_tuned["choices"][0]["message"]["content"] == want
    assert got_tuned["model"] == "tuned"
    assert got_base["choices"][0]["message"]["content"] != want  # the adapter changes the answer


def test_prefix_caching_reuses_earlier_turns_and_changes_nothing(base_and_adapter):
    base, _ = base_and_adapter
    system = {"role": "system", "content": "You are a careful assistant. " * 8}
    turns = ["Once upon a time", "Speak, speak.", "Resolved. resolved."]
    answers = {}
    for caching in (True, False):
        models = build_models(str(base), prefix_caching=caching, max_batch_size=4, kv_cache_mb=8)
        msgs = [system]
        with BackgroundServer(models) as url:
            for turn in turns:
                msgs.append({"role": "user", "content": turn})
                reply = chat(url, "base", msgs)["choices"][0]["message"]["content"]
                msgs.append({"role": "assistant", "content": reply})
            hits = counter(url, "llmlab:prefix_cache_hits_total", "base")
        answers[caching] = msgs
        assert (hits > 0) == caching
    assert answers[True] == answers[False]


def test_cli_rejects_bad_options(capsys):
    assert main(["serve", "nowhere", "--lora", "no-equals-sign"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "nowhere", "--max-concurrency", "0"]) == 2


@pytest.mark.slow
def test_smollm2_over_http_matches_the_engine_and_follows_a_schema(smollm2_gguf):
    llm = LLM(smollm2_gguf, enable_prefix_caching=True)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(max_tokens=24, stop_token_ids=chat_stop_ids(llm.tokenizer))
    want = llm.generate([msgs], params)[0]  # before the server owns the engine
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "country": {"type": "string", "maxLength": 30},
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    with BackgroundServer([ServedModel("smollm2", llm, root=str(smollm2_gguf))]) as url:
        got = chat(url, "smollm2", msgs)
        body = {
            "messages": msgs, "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
        }  # fmt: skip
        structured = httpx.post(url + "/v1/chat/completions", json=body).json()
    assert (
        got["choices"][0]["message"]["content"] == want.text[: len(got["choices"][0]["message"]["content"])]
    )
    data = json.loads(structured["choices"][0]["message"]["content"])
    assert set(data) == {"city", "country"}
    print("smollm2:", want.text, "|", data)


def test_auto_tool_choice_parses_the_models_tool_call_block():
    llm = LLM.from_model(H.model(max_seq_len=1024), H.tokenizer())
    forced = Forced(llm)
    forced.reply = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    body = {"messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": [tool], "max_tokens": 200}
    with BackgroundServer([ServedModel("tiny", llm, root="tiny")]) as url:
        plain = httpx.post(url + "/v1/chat/completions", json=body).json()["choices"][0]
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        forced.reply = "No tools needed."
        none = httpx.post(url + "/v1/chat/completions", json=body).json()["choices"][0]
    assert plain["finish_reason"] == "tool_calls" and plain["message"]["content"] == "Let me check."
    call = plain["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Rome"}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas).strip() == "Let me check."
    assert [d["tool_calls"][0]["function"]["name"] for d in deltas if d.get("tool_calls")] == ["get_weather"]
    assert none["finish_reason"] == "stop" and none["message"]["content"] == "No tools needed."
    assert "tool_calls" not in none["message"]


def test_ngram_speculation_serves_the_same_greedy_answers(base_and_adapter):
    base, _ = base_and_adapter
    msgs = [{"role": "user", "content": "Speak, speak. Speak, speak. Speak, speak."}]
    answers = []
    for speculative in (None, "ngram"):
        models = build_models(str(base), speculative=speculative, max_batch_size=4, kv_cache_mb=8)
        with BackgroundServer(models) as url:
            answers.append(chat(url, "base", msgs)["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]


def test_cli_serve_steps_on_the_main_thread_and_stops_cleanly_on_ctrl_c(tmp_path):
    """`llmlab serve` runs uvicorn on a side thread and the engine loop on the main thread (OpenMP kernels are
    slower off it). Ctrl-C mid-stream ends the stream with a 503-shaped error chunk and exits 0 without a
    traceback; a second server on the same port fails with one line and exit 2."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from llmlab.serve.server import free_port

    save_checkpoint(tmp_path / "m", H.model(max_seq_len=8192), H.tokenizer())
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "llmlab",
        "serve",
        str(tmp_path / "m"),
        "--port",
        str(port),
        "--fast",
        "int8",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"could not serve on 127.0.0.1:{port}" in second.stderr.strip().splitlines()[-1]

        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8000, "ignore_eos": True,
                "stream": True, "temperature": 0}  # fmt: skip
        lines = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if len(lines) == 3:
                        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["error"]["code"] == "server_shutting_down"
        assert len(lines) < 4000  # it stopped early, not at max_tokens
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
