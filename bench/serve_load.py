"""Load benchmark for ``llmlab serve`` (and llama.cpp's ``llama-server`` as the peer), over HTTP on loopback.

    .venv/bin/python bench/serve_load.py [--models tiny,smollm2-int8,smollm2-int4] [--concurrency 1,4,16,64]
        [--duration 60] [--max-tokens 64] [--llama-server PATH] [--prefix-turns 4] [--json OUT]

Each configuration runs as its own server process (``python -m llmlab serve ...`` / ``llama-server``). For
every concurrency level, that many streaming clients (``/v1/chat/completions``, greedy, ``max_tokens``,
``ignore_eos`` so every request generates the same length) loop for ``--duration`` seconds over the same
prompts. Reported per level: output tokens/s (usage counts, all clients together), p50/p99 time to first
token and inter-token latency (gaps between content chunks / tokens in them), errors, KV blocks still in use
after the clients finished (from ``/metrics``), and the server's RSS before and after.

Peer: ``llama-server`` (built from the llama.cpp that llama-cpp-python's sdist vendors, cached outside the
repo: see ../shared/NOTES.md) on SmolLM2's Q4_1 GGUF with ``--parallel`` = the client count, compared with
llmlab's int4 path. Skipped with a reason when the binary is absent.

Prefix caching: ``--prefix-turns`` turns of one chat (long system prompt, each turn appending the previous
answer) against a server with and without prefix caching; TTFT of the later turns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmlab.loading import smollm2_path  # noqa: E402
from llmlab.serve.server import free_port  # noqa: E402

LLAMA_SERVER = Path("/root/.cache/llmlab-bench/llama.cpp/build/bin/llama-server")
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works to a child.",
    "List some ideas for a rainy afternoon.",
    "Describe the water cycle in simple words.",
    "What makes a good breakfast? Explain.",
    "Tell me about the history of paper.",
]
SYSTEM = "You are a helpful assistant. Answer clearly, step by step, with examples. " * 6


def tiny_checkpoint(directory: Path) -> Path:
    """A 2-layer random model with SmolLM2's tokenizer (the 'tiny' configuration)."""
    import torch

    from llmlab.interop.gguf import open_gguf, tokenizer_from_gguf
    from llmlab.model import ModelConfig, Transformer
    from llmlab.model.checkpoint import save_checkpoint

    if (directory / "config.json").exists():
        return directory
    tok = tokenizer_from_gguf(open_gguf(smollm2_path()), "smollm2")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=49152, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=2048)
    save_checkpoint(directory, Transformer(cfg).eval(), tok)
    return directory


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


async def one_request(client: httpx.AsyncClient, body: dict, stats: dict) -> None:
    t0 = time.perf_counter()
    last, first, tokens, chunks = None, None, 0, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            stats["errors"] += 1
            await r.aread()
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                chunks += 1
                now = time.perf_counter()
                if first is None:
                    first = now
                    stats["ttft"].append(now - t0)
                elif last is not None:
                    stats["itl"].append(now - last)
                last = now
    stats["tokens"] += tokens or chunks  # a server without usage in its stream: one token per chunk
    stats["requests"] += 1


async def load(url: str, model: str, clients: int, duration: float, max_tokens: int) -> dict:
    stats = {"ttft": [], "itl": [], "tokens": 0, "requests": 0, "errors": 0}
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < deadline:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                try:
                    await one_request(client, body, stats)
                except httpx.HTTPError:
                    stats["errors"] += 1
                k += clients

        start_t = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.perf_counter() - start_t
    return {
        "clients": clients,
        "tok_s": stats["tokens"] / elapsed,
        "requests": stats["requests"],
        "errors": stats["errors"],
        "ttft_p50_ms": 1e3 * pct(stats["ttft"], 50),
        "ttft_p99_ms": 1e3 * pct(stats["ttft"], 99),
        "itl_p50_ms": 1e3 * pct(stats["itl"], 50),
        "itl_p99_ms": 1e3 * pct(stats["itl"], 99),
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def blocks_used(url: str) -> float | None:
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    m = re.findall(r"^llmlab:kv_cache_blocks_used\{[^}]*\} (\S+)$", text, re.M)
    return sum(float(v) for v in m) if m else None


def llmlab_cmd(model: str, port: int, fast: str | None, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "llmlab", "serve", model, "--port", str(port), "--max-concurrency", "64"]
    cmd += ["--max-queue", "256", "--served-model-name", "m"] + (["--fast", fast] if fast else []) + extra
    return cmd


def run_server(
    name: str, cmd: list[str], port: int, levels: list[int], args: argparse.Namespace
) -> list[dict]:
    proc = start(cmd, port)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        asyncio.run(load(url, "m", 1, min(3.0, args.duration), args.max_tokens))  # warm-up
        before = rss_mb(proc.pid)
        for clients in levels:
            row = asyncio.run(load(url, "m", clients, args.duration, args.max_tokens))
            time.sleep(0.5)
            row.update(
                server=name,
                blocks_after=blocks_used(url),
                rss_before_mb=before,
                rss_after_mb=rss_mb(proc.pid),
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        stop(proc)
    return rows


async def multi_turn(url: str, turns: int) -> list[float]:
    messages = [{"role": "system", "content": SYSTEM}]
    ttfts = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for k in range(turns):
            messages.append({"role": "user", "content": PROMPTS[k % len(PROMPTS)]})
            body = {"model": "m", "messages": messages, "max_tokens": 48, "temperature": 0, "stream": True}
            stats = {"ttft": [], "itl": [], "tokens": 0, "requests": 0, "errors": 0}
            t0 = time.perf_counter()
            text = []
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        delta = (
                            (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {}).get("content")
                        )
                        if delta:
                            if not text:
                                stats["ttft"].append(time.perf_counter() - t0)
                            text.append(delta)
            ttfts.append(stats["ttft"][0] if stats["ttft"] else float("nan"))
            messages.append({"role": "assistant", "content": "".join(text)})
    return ttfts


def prefix_caching(model: str, fast: str | None, turns: int) -> dict:
    out = {}
    for caching in (True, False):
        port = free_port()
        extra = [] if caching else ["--no-prefix-caching"]
        proc = start(llmlab_cmd(model, port, fast, extra), port)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(load(url, "m", 1, 2.0, 8))  # warm-up (different prompt: no shared prefix)
            ttfts = [
                statistics.median(x) for x in zip(*[asyncio.run(multi_turn(url, turns)) for _ in range(3)])
            ]
        finally:
            stop(proc)
        out["on" if caching else "off"] = [round(1e3 * t, 1) for t in ttfts]
        print(
            f"prefix caching {'on' if caching else 'off'}: TTFT per turn (ms) {out['on' if caching else 'off']}"
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,smollm2-int8,smollm2-int4")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--llama-server", default=str(LLAMA_SERVER))
    ap.add_argument("--prefix-turns", type=int, default=4, help="0 skips the prefix-caching TTFT measurement")
    ap.add_argument("--json", default=None, help="write all rows here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(x) for x in args.concurrency.split(",")]
    gguf = str(smollm2_path())
    results: dict = {"rows": [], "args": vars(args)}
    for name in args.models.split(","):
        if name == "tiny":
            model, fast = str(tiny_checkpoint(Path(tempfile.gettempdir()) / "llmlab-bench-tiny")), None
        else:
            model, fast = gguf, name.split("-")[1]
        print(f"== llmlab {name}", flush=True)
        results["rows"] += run_llmlab(name, model, fast, levels, args)
    binary = Path(args.llama_server)
    if binary.exists():
        for clients in levels:
            port = free_port()
            # 512 context tokens per slot (a ~40-token prompt + max_tokens fits); --ignore-eos as ours.
            cmd = [str(binary), "-m", gguf, "--port", str(port), "--parallel", str(clients)]
            cmd += ["-c", str(512 * clients), "--alias", "m", "-t", "2", "--log-disable", "--ignore-eos"]
            print(f"== llama-server Q4_1 --parallel {clients}", flush=True)
            results["rows"] += run_server("llama-server Q4_1", cmd, port, [clients], args)
    else:
        print(f"llama-server peer skipped: {binary} is absent (build recipe in ../shared/NOTES.md)")
    if args.prefix_turns:
        results["prefix_caching_ttft_ms"] = prefix_caching(gguf, "int8", args.prefix_turns)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def run_llmlab(
    name: str, model: str, fast: str | None, levels: list[int], args: argparse.Namespace
) -> list[dict]:
    port = free_port()
    return run_server(f"llmlab {name}", llmlab_cmd(model, port, fast, []), port, levels, args)


if __name__ == "__main__":
    sys.exit(main())
