"""Where a single stream's time goes: the same SmolLM2 engine in-process, behind the server's engine loop
(no HTTP) stepping on a side thread and on the main thread (``llmlab serve``'s arrangement), and over HTTP (``llmlab serve`` in its own process, one streaming client), in one run.

    .venv/bin/python bench/serve_overhead.py [--fast int4] [--max-tokens 96] [--repeats 3]
        [--max-concurrency 16]

Prints ms per output token (decode only: first token excluded) for each path and the ratios to in-process.
The in-process and engine-thread paths use one engine built with the server's options (prefix caching on,
``max_batch_size`` = ``--max-concurrency``), so what differs is the hand-off and the HTTP layer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmlab.loading import smollm2_path  # noqa: E402
from llmlab.serve.server import free_port  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def decode_ms(stamps: list[float]) -> float:
    """Mean gap between output tokens after the first (ms)."""
    return 1000 * (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)


def in_process(llm, params, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        rid = llm.add_request(PROMPT, params)
        stamps: list[float] = []
        while llm.has_unfinished():
            for o in llm.step():
                if o.request_id == rid and o.delta_token_ids:
                    stamps += [time.perf_counter()] * len(o.delta_token_ids)
        out.append(decode_ms(stamps))
    return out


def engine_thread(llm, params, repeats: int) -> list[float]:
    from llmlab.serve.engine_thread import EngineThread
    from llmlab.serve.metrics import ServerMetrics

    engine = EngineThread({"m": llm}, ServerMetrics(), max_pending=64)
    engine.start()
    return asyncio.run(stream_decode_ms(engine, params, repeats, "side"))


async def stream_decode_ms(engine, params, repeats: int, tag: str) -> list[float]:
    """Submit ``repeats`` requests one after another through ``engine`` and time each one's tokens as the
    event loop receives them; stops the engine at the end."""
    res = []
    try:
        for i in range(repeats):
            stream = engine.submit("m", [(f"{tag}{i}", PROMPT, params)])
            stamps: list[float] = []
            while not stream.done:
                _, out = await stream.queue.get()
                if out.delta_token_ids:
                    stamps += [time.perf_counter()] * len(out.delta_token_ids)
                if out.finished:
                    stream.finished.add(out.request_id)
            res.append(decode_ms(stamps))
    finally:
        engine.stop()
    return res


def engine_on_main_thread(llm, params, repeats: int) -> list[float]:
    """``llmlab serve``'s arrangement: the engine loop on this (main) thread, the event loop on a side one."""
    import threading

    from llmlab.serve.engine_thread import EngineThread
    from llmlab.serve.metrics import ServerMetrics

    engine = EngineThread({"m": llm}, ServerMetrics(), max_pending=64, own_thread=False)
    res: list[float] = []
    side = threading.Thread(
        target=lambda: res.extend(asyncio.run(stream_decode_ms(engine, params, repeats, "main")))
    )
    side.start()
    engine.run_here()
    side.join()
    return res


def over_http(model: str, fast: str, concurrency: int, max_tokens: int, repeats: int) -> list[float]:
    port = free_port()
    cmd = [sys.executable, "-m", "llmlab", "serve", model, "--port", str(port), "--fast", fast,
           "--max-concurrency", str(concurrency)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.5)
        body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}  # fmt: skip
        res = []
        with httpx.Client(timeout=120) as client:
            for _ in range(repeats + 1):  # the first request warms the server up
                stamps: list[float] = []
                with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        if delta.get("content"):
                            stamps.append(time.perf_counter())
                res.append(decode_ms(stamps))
        return res[1:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", default="int4", choices=["int8", "int4"])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-concurrency", type=int, default=16)
    args = ap.parse_args()
    import torch

    from llmlab.infer import LLM, SamplingParams

    torch.set_num_threads(2)
    model = str(smollm2_path())
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm = LLM(model, fast=args.fast, max_batch_size=args.max_concurrency, enable_prefix_caching=True)
    in_process(llm, params, 1)  # warm-up
    rows = {
        "in-process LLM.step": in_process(llm, params, args.repeats),
        "engine on a side thread": engine_thread(llm, params, args.repeats),
        "engine on the main thread": engine_on_main_thread(llm, params, args.repeats),
    }
    del llm
    rows["HTTP stream (llmlab serve)"] = over_http(
        model, args.fast, args.max_concurrency, args.max_tokens, args.repeats
    )
    base = statistics.median(rows["in-process LLM.step"])
    print(f"SmolLM2-135M-Instruct {args.fast}, batch 1, {args.max_tokens} tokens, median of {args.repeats}")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"  {name:30s} {med:7.2f} ms/token  ({1000 / med:6.1f} tok/s)  x{med / base:.2f}")


if __name__ == "__main__":
    main()
