"""Building the served models (base + LoRA adapters) and the startup report; running a server in-process.

:class:`BackgroundServer` runs uvicorn on a thread on a free loopback port: the tests, the load benchmark
and the demo use it to talk to a real server over HTTP.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from llmlab.errors import LLMLabError
from llmlab.infer import LLM
from llmlab.loading import resolve_model_path
from llmlab.serve.app import create_app
from llmlab.serve.openai_api import ServedModel


def build_models(
    model: str,
    *,
    served_name: str | None = None,
    adapters: dict[str, str] | None = None,
    fast: str | None = None,
    max_batch_size: int = 16,
    speculative: str | None = None,
    kv_cache_mb: float = 256.0,
    max_model_len: int | None = None,
    prefix_caching: bool = True,
) -> list[ServedModel]:
    """One engine for the base and one per adapter (each adapter's requests batch together)."""
    path = resolve_model_path(model)
    name = served_name or Path(str(model).rstrip("/")).name
    opts: dict[str, Any] = {
        "max_batch_size": max_batch_size,
        "kv_cache_mb": kv_cache_mb,
        "max_model_len": max_model_len,
        "fast": fast or True,
        "speculative": speculative,
        "enable_prefix_caching": prefix_caching,
    }
    models = [ServedModel(name, LLM(path, **opts), root=str(path))]
    for adapter_name, directory in (adapters or {}).items():
        llm = LLM(path, adapter=directory, **opts)
        models.append(ServedModel(adapter_name, llm, root=str(directory), parent=name))
    return models


def startup_lines(models: list[ServedModel], host: str, port: int, api_key: str | None) -> list[str]:
    """What the server logs when it starts: URL, models, KV capacity, API-key state (and a warning)."""
    shown = f"[{host}]" if ":" in host else host
    lines = [f"llmlab serve: http://{shown}:{port}/v1 (chat page http://{shown}:{port}/)"]
    for m in models:
        stats = m.llm.stats
        lines.append(
            f"model {m.name!r} from {m.root}: context {m.max_model_len} tokens, KV cache "
            f"{int(stats['kv_capacity_tokens'])} tokens ({int(stats['kv_blocks_total'])} blocks), "
            f"prefix caching {'on' if m.llm.cache.prefix_caching else 'off'}"
        )
    lines.append(f"API key: {'required' if api_key else 'none (anyone who can reach the port can use it)'}")
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        lines.append(
            f"WARNING: binding {host} without --api-key: every machine that can reach it can use the model"
        )
    return lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_forever(app: Any, host: str, port: int) -> None:
    """Run ``app`` (built with ``engine_on_caller=True``) until Ctrl-C or SIGTERM: uvicorn's event loop on a
    background thread, the engine loop on this (the main) thread -- see :mod:`llmlab.serve.engine_thread`
    for why the engine wants the main thread."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, name="llmlab-http", daemon=True)
    http.start()
    while not server.started:  # the engine loop must not start before the port is bound
        if not http.is_alive():
            raise LLMLabError(f"could not serve on {host}:{port} (is the port in use? see the log above)")
        time.sleep(0.02)
    # uvicorn cannot take signals on its (non-main) thread: SIGINT and SIGTERM both stop the engine loop here
    # (SIGINT explicitly too: a shell starts background jobs with it ignored, and uvicorn overrode that as well).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        app.state.engine.run_here()  # returns when uvicorn stops (its lifespan stops the engine)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        app.state.engine.stop()
        http.join(timeout=10)


class BackgroundServer:
    """``with BackgroundServer(models) as url:`` -- a real uvicorn server on a loopback port, on a thread."""

    def __init__(self, models: list[ServedModel], port: int | None = None, **app_options: Any):
        self.app = create_app(models, **app_options)
        self.port = port or free_port()
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="llmlab-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
