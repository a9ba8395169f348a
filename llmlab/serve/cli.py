"""``llmlab serve MODEL``: the OpenAI-compatible server (and the chat page at ``/``).

Import-light: torch, the engine, FastAPI and uvicorn load inside the handler.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over the OpenAI API (chat, completions, streaming, tools, metrics) + a chat page",
        description="Serve MODEL at http://HOST:PORT/v1/... (OpenAI API), /health, /metrics and a chat page at /.",
    )
    p.add_argument("model", help="llmlab checkpoint dir, Hugging Face model dir, .gguf file, or 'smollm2'")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set LLMLAB_API_KEY)"
    )
    p.add_argument(
        "--served-model-name", default=None, help="model id in /v1/models (default: the path's name)"
    )
    p.add_argument("--fast", default=None, choices=["int8", "int4"], help="quantize the decode path on load")
    p.add_argument(
        "--lora", action="append", default=[], metavar="NAME=DIR", help="serve a LoRA adapter as model NAME"
    )
    p.add_argument("--max-concurrency", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="sequences queued or running before 429 (default 4x concurrency)",
    )
    p.add_argument(
        "--speculative", default=None, choices=["ngram"], help="speculative decoding (n-gram drafts)"
    )
    p.add_argument("--kv-cache-mb", type=float, default=256.0, help="paged KV cache pool (default 256 MiB)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import logging

    from llmlab.errors import ConfigError
    from llmlab.serve.app import create_app
    from llmlab.serve.server import build_models, serve_forever, startup_lines

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("llmlab.serve")
    api_key = args.api_key or os.environ.get("LLMLAB_API_KEY") or None
    if args.max_concurrency <= 0:
        raise ConfigError(f"--max-concurrency must be positive, got {args.max_concurrency}")
    adapters = {}
    for item in args.lora:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--lora {item!r}: expected NAME=DIR")
        if not Path(directory).is_dir():
            raise ConfigError(f"--lora {item!r}: {directory} is not a directory")
        adapters[name] = directory
    models = build_models(
        args.model,
        served_name=args.served_model_name,
        adapters=adapters,
        fast=args.fast,
        max_batch_size=args.max_concurrency,
        speculative=args.speculative,
        kv_cache_mb=args.kv_cache_mb,
        max_model_len=args.max_model_len,
        prefix_caching=not args.no_prefix_caching,
    )
    app = create_app(
        models, api_key=api_key, max_pending=args.max_queue or 4 * args.max_concurrency, engine_on_caller=True
    )
    for line in startup_lines(models, args.host, args.port, api_key):
        (log.warning if line.startswith("WARNING") else log.info)(line)
    serve_forever(app, args.host, args.port)
    return 0
