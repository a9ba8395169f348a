"""The FastAPI application: routes, API key, body limit, queue limit, SSE streaming, errors in OpenAI's shape.

``create_app(models, ...)`` builds the app over :class:`ServedModel` s. The engine thread starts with the
app (lifespan) and stops with it. Handlers translate the request (:mod:`llmlab.serve.openai_api`), submit it
to the engine thread, and read its outputs; a streaming response that ends early (client gone) aborts its
sequences, which frees their KV blocks before the next engine step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab.errors import LLMLabError
from llmlab.serve import openai_api as api
from llmlab.serve.engine_thread import EngineThread, RequestStream
from llmlab.serve.metrics import CONTENT_TYPE, ServerMetrics
from llmlab.serve.protocol import (
    ERROR_RESPONSES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from llmlab.serve.responses import chat_stream, completion_stream, final_chat, final_completion
from llmlab.serve.tools import template_messages

log = logging.getLogger("llmlab.serve")
MAX_BODY_BYTES = 4 * 2**20


class _Guard:
    """Pure ASGI middleware: body size limit, API key on /v1 and the tokenizer routes, HTTP status counts.

    (Not Starlette's BaseHTTPMiddleware: it would hide the client's disconnect from streaming handlers.)
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http.labels(status=str(message["status"])).inc()
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            return await _error(refusal)(scope, receive, counted_send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
            return message

        await self.app(scope, limited_receive, counted_send)

    def _refusal(self, scope: dict) -> APIError | None:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return _too_large(self.max_body_bytes)
        path = scope.get("path", "")
        if self.api_key and (path.startswith("/v1/") or path in ("/tokenize", "/detokenize")):
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.api_key.encode()):  # constant time
                return APIError("missing or incorrect API key", 401, code="invalid_api_key")
        return None


# A generation answers JSON, or server-sent events with "stream": true.
_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the completion", "content": {"application/json": {}, "text/event-stream": {}}},
    **ERROR_RESPONSES,
}


def _too_large(limit: int) -> APIError:
    return APIError(f"request body is larger than {limit} bytes", 413, code="too_large")


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def create_app(
    models: list[api.ServedModel],
    *,
    api_key: str | None = None,
    max_pending: int = 64,
    max_body_bytes: int = MAX_BODY_BYTES,
    engine_on_caller: bool = False,
) -> FastAPI:
    """The server over ``models`` (the first is the default); ``max_pending`` sequences at most in flight.

    ``engine_on_caller``: the app does not start the engine's thread; whoever runs uvicorn calls
    ``app.state.engine.run_here()`` (``llmlab serve`` does, on the main thread)."""
    by_name = {m.name: m for m in models}
    metrics = ServerMetrics()
    engine = EngineThread(
        {m.name: m.llm for m in models}, metrics, max_pending, own_thread=not engine_on_caller
    )
    metrics.attach(lambda: engine.stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine.own_thread:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="llmlab", version="1", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.models = engine, metrics, by_name

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or None
        message = (
            f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid body"))
        )
        return _error(APIError(message, 400, param=where, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(APIError(str(exc.detail), exc.status_code))

    def resolve(name: str | None) -> api.ServedModel:
        if name is None or name == "":
            return models[0]
        if name not in by_name:
            raise APIError(f"the model {name!r} does not exist (served: {', '.join(by_name)})", 404, "model")
        return by_name[name]

    async def submit(prepared: api.PreparedRequest) -> RequestStream:
        try:
            return engine.submit(prepared.model.name, prepared.prompts)
        except OverflowError as exc:
            raise APIError(f"server busy: {exc}; retry later", 429, headers={"Retry-After": "1"}) from exc

    async def events(stream: RequestStream) -> AsyncIterator[tuple[int, Any]]:
        """The stream's events until every sub-request finished; aborts the rest if the reader stops."""
        try:
            while not stream.done:
                index, item = await stream.queue.get()
                if index < 0:  # the client disconnected
                    return
                if isinstance(item, Exception) or item.finished:
                    stream.finished.add(stream.request_ids[index])
                yield index, item
        finally:
            if not stream.done:
                engine.abort(stream)

    async def collect(stream: RequestStream) -> dict[int, Any]:
        finals: dict[int, Any] = {}
        async for index, item in events(stream):
            if isinstance(item, Exception):
                raise api.engine_error(item)
            if item.finished:
                finals[index] = item
        return finals

    async def first_then_rest(stream: RequestStream) -> AsyncIterator[tuple[int, Any]]:
        """Wait for the first event (a bad request fails before the 200 is sent), then yield them all."""
        source = events(stream)
        try:
            first = await source.__anext__()
        except StopAsyncIteration:  # the client left before the first token
            raise APIError("client disconnected", 499) from None
        if isinstance(first[1], Exception):
            await source.aclose()
            raise api.engine_error(first[1])

        async def chained() -> AsyncIterator[tuple[int, Any]]:
            try:
                yield first
                async for event in source:
                    yield event
            finally:
                await source.aclose()

        return chained()

    def watch_disconnect(request: Request, stream: RequestStream) -> asyncio.Task:
        """A task that aborts ``stream`` as soon as the client goes (uvicorn drops writes to a closed socket
        silently, so a streaming response would otherwise only notice at its end)."""

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            engine.abort(stream)
            stream.queue.put_nowait((-1, None))  # wakes the reader, which stops

        return asyncio.create_task(watch())

    def sse(watcher: asyncio.Task, chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                watcher.cancel()
                await chunks.aclose()

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def generate(request: Request, prepared: api.PreparedRequest, streaming: Any, final: Any) -> Any:
        stream = await submit(prepared)
        watcher = watch_disconnect(request, stream)
        try:
            if streaming is not None:
                return sse(watcher, streaming(prepared, await first_then_rest(stream)))
            return final(prepared, await collect(stream))
        except BaseException:
            watcher.cancel()
            raise
        finally:
            if streaming is None:
                watcher.cancel()

    @app.post("/v1/chat/completions", responses=_GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        prepared = await run_in_threadpool(api.prepare_chat, body, resolve(body.model))  # templates, grammars
        usage = bool(body.stream_options and body.stream_options.include_usage)
        streaming = (lambda p, ev: chat_stream(p, ev, usage)) if body.stream else None
        return await generate(request, prepared, streaming, final_chat)

    @app.post("/v1/completions", responses=_GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prepared = await run_in_threadpool(api.prepare_completion, body, resolve(body.model))
        usage = bool(body.stream_options and body.stream_options.include_usage)
        streaming = (lambda p, ev: completion_stream(p, ev, usage)) if body.stream else None
        return await generate(request, prepared, streaming, final_completion)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        cards = [
            ModelCard(
                id=m.name, created=m.created, root=m.root, parent=m.parent, max_model_len=m.max_model_len
            )
            for m in models
        ]
        return ModelList(data=cards)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        model = resolve(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("give exactly one of 'prompt' and 'messages'", param="prompt")
        try:
            if body.messages is not None:
                _, ids = model.llm.encode_prompt(
                    template_messages(body.messages, None), add_generation_prompt=body.add_generation_prompt
                )
            else:
                ids = model.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except LLMLabError as exc:
            raise APIError(str(exc), param="messages" if body.messages is not None else "prompt") from exc
        return TokenizeResponse(count=len(ids), max_model_len=model.max_model_len, tokens=ids)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        model = resolve(body.model)
        bad = [t for t in body.tokens if not 0 <= t < model.tokenizer.vocab_size]
        if bad:
            raise APIError(f"token id {bad[0]} is outside the vocabulary", param="tokens")
        return DetokenizeResponse(prompt=model.tokenizer.decode(body.tokens))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", responses={200: {"description": "Prometheus text", "content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(_asset("index.html"), headers={"Content-Security-Policy": _CSP})

    @app.get("/ui/{name}", include_in_schema=False)
    async def chat_asset(name: str) -> Response:
        if name not in _UI_FILES:
            raise APIError(f"no such file {name!r}", 404)
        return Response(_asset(name), media_type=_UI_FILES[name], headers={"Content-Security-Policy": _CSP})

    return app


# Scripts only from the server's own files: a <script> that reached the DOM could not run (defence in depth;
# the page never inserts model output as HTML in the first place).
_CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'"
_UI_FILES = {"chat.js": "text/javascript", "chat.css": "text/css"}


def _asset(name: str) -> str:
    return resources.files("llmlab").joinpath(f"assets/serve/{name}").read_text(encoding="utf-8")
