"""The server's engine thread: the one owner of the :class:`~llmlab.infer.LLM` engines.

HTTP handlers never touch an engine. They call :meth:`EngineThread.submit`, which puts a command on a
thread-safe queue and returns a :class:`RequestStream`; the engine thread adds the request, runs
``LLM.step()`` while any engine has work, and hands each step's :class:`RequestOutput` snapshots back to the
event loop (one ``call_soon_threadsafe`` per step). ``abort`` is a command too, so a cancelled request leaves
the batch -- and its KV blocks are freed -- before the next step.

Several engines (a base model and its LoRA adapters, each its own ``LLM``) take turns: one step each while
they have work, so requests for different adapters are batched per adapter.

**Which thread steps.** ``llmlab serve`` runs the engine loop on the process's *main* thread
(:meth:`EngineThread.run_here`) and uvicorn's event loop on a background thread: PyTorch's OpenMP
kernels (the int4/int8 GEMVs most of all) run 1.6-3x slower when a non-main thread drives them on this
2-core machine, so stepping from a side thread cost a single stream 1.6x its in-process decode rate
(BENCHMARKS.md, issue 18). In-process users (tests, :class:`~llmlab.serve.server.BackgroundServer`) keep
the main thread for themselves and call :meth:`EngineThread.start` instead.

The thread also keeps the request-level metrics (time to first token, time per output token, end-to-end
latency, outcomes) and publishes each engine's ``LLM.stats`` after every step for ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llmlab.serve.metrics import ServerMetrics

log = logging.getLogger("llmlab.serve")


class ServerShuttingDown(Exception):
    """Delivered to the requests still running when the engine loop stops (HTTP 503)."""


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one request."""

    stream: RequestStream
    engine: str
    index: int
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0


@dataclass
class RequestStream:
    """What a handler reads: events ``(index, RequestOutput | LLMLabError | Exception)`` of its sub-requests
    (``n`` choices share one stream). ``finished`` is kept by the reader (event-loop side only)."""

    loop: asyncio.AbstractEventLoop
    request_ids: list[str]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: set[str] = field(default_factory=set)

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.request_ids)


class EngineThread:
    """Owns ``engines`` (model name -> ``LLM``) on one thread; see the module docstring.

    ``max_pending`` bounds the requests in the system (running + waiting): :meth:`submit` refuses beyond it
    so the handler can answer 429.
    """

    def __init__(
        self, engines: dict[str, Any], metrics: ServerMetrics, max_pending: int, own_thread: bool = True
    ):
        self.engines = engines
        self.own_thread = own_thread  # False: the caller runs the loop itself (run_here)
        self.metrics = metrics
        self.max_pending = max_pending
        self.stats: dict[str, dict[str, float]] = {name: llm.stats for name, llm in engines.items()}
        self._commands: queue.Queue = queue.Queue()
        self._tracked: dict[str, _Tracked] = {}
        self._pending = 0  # sequences accepted and not finished (read by handlers: a plain int is atomic)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmlab-engine", daemon=True)

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        """Step on a thread of our own (the app's lifespan calls this unless ``own_thread`` is False)."""
        self._thread.start()

    def run_here(self) -> None:
        """Step on the calling thread until :meth:`stop` (``llmlab serve``: the main thread)."""
        self._run()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, engine: str, prompts: list[tuple[str, Any, Any]]) -> RequestStream:
        """Queue sub-requests ``(request_id, prompt, SamplingParams)`` on ``engine``; their outputs arrive on
        the returned stream. Raises :class:`OverflowError` when the queue is full."""
        with self._lock:
            if self._pending + len(prompts) > self.max_pending:
                raise OverflowError(
                    f"{self._pending} requests are queued or running (limit {self.max_pending})"
                )
            self._pending += len(prompts)
        stream = RequestStream(asyncio.get_running_loop(), [rid for rid, _, _ in prompts])
        self._commands.put(("add", engine, stream, prompts, time.perf_counter()))
        return stream

    def abort(self, stream: RequestStream) -> None:
        """Cancel every unfinished sub-request of ``stream`` (client gone)."""
        rest = [rid for rid in stream.request_ids if rid not in stream.finished]
        if rest:
            self._commands.put(("abort", rest))

    # ------------------------------------------------------------------ engine-thread side
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = any(llm.has_unfinished() for llm in self.engines.values())
                try:
                    self._handle(self._commands.get(block=not busy, timeout=None if not busy else 0))
                    while True:  # drain everything that arrived: all of it joins the next step
                        self._handle(self._commands.get_nowait())
                except queue.Empty:
                    pass
                events: list[tuple[RequestStream, tuple[int, Any]]] = []
                for name, llm in self.engines.items():
                    if llm.has_unfinished():
                        self._step(name, llm, events)
                    self.stats[name] = llm.stats
                self._deliver(events)
        finally:  # also on Ctrl-C, which lands here when this is the main thread
            self._fail_unfinished()

    def _fail_unfinished(self) -> None:
        """End every request still in flight with an error, so its handler (and uvicorn's graceful shutdown)
        finishes at once instead of waiting for tokens that will never come."""
        events = []
        shutting_down = ServerShuttingDown("the server is shutting down")
        while True:  # requests submitted but never added to an engine
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                self._release(len(command[3]))
                events += [(command[2], (index, shutting_down)) for index in range(len(command[3]))]
        for rid, tracked in list(self._tracked.items()):
            self.engines[tracked.engine].abort(rid)
            self._finish(rid, tracked, "abort")
            events.append(
                (tracked.stream, (tracked.index, ServerShuttingDown("the server is shutting down")))
            )
        self._deliver(events)

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, engine, stream, prompts, arrival = command
            events = []
            llm = self.engines[engine]
            for index, (rid, prompt, params) in enumerate(prompts):
                try:
                    llm.add_request(prompt, params, request_id=rid)
                except Exception as exc:  # LLMLabError: bad request; anything else: a server error
                    self._release(1)
                    events.append((stream, (index, exc)))
                    continue
                self._tracked[rid] = _Tracked(stream, engine, index, arrival)
            self._deliver(events)
        elif kind == "abort":
            for rid in command[1]:
                tracked = self._tracked.pop(rid, None)
                if tracked is not None:
                    self.engines[tracked.engine].abort(rid)
                    self._release(1)
                    self.metrics.finished("abort")

    def _step(self, name: str, llm: Any, events: list) -> None:
        try:
            outputs = llm.step()
        except Exception as exc:  # an engine bug must not take the server down: fail this engine's requests
            log.exception("engine %s failed a step", name)
            for rid, tracked in list(self._tracked.items()):
                if tracked.engine == name:
                    llm.abort(rid)
                    self._finish(rid, tracked, "error")
                    events.append((tracked.stream, (tracked.index, exc)))
            return
        now = time.perf_counter()
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue  # aborted meanwhile
            if out.delta_token_ids:
                if tracked.first_token is None:
                    tracked.first_token = now
                    self.metrics.ttft.observe(now - tracked.arrival)
                elif tracked.last_token is not None:
                    per_token = (now - tracked.last_token) / len(out.delta_token_ids)
                    for _ in out.delta_token_ids:
                        self.metrics.tpot.observe(per_token)
                tracked.last_token = now
                tracked.num_tokens += len(out.delta_token_ids)
            if out.finished:
                self._finish(out.request_id, tracked, out.finish_reason)
            events.append((tracked.stream, (tracked.index, out)))

    def _finish(self, rid: str, tracked: _Tracked, reason: str) -> None:
        self._tracked.pop(rid, None)
        self._release(1)
        self.metrics.e2e.observe(time.perf_counter() - tracked.arrival)
        self.metrics.finished(reason)

    def _release(self, count: int) -> None:
        with self._lock:
            self._pending -= count

    @staticmethod
    def _deliver(events: list[tuple[RequestStream, tuple[int, Any]]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, event in events:
            by_loop.setdefault(stream.loop, []).append((stream.queue, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed (server shutting down)
                pass


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, event in items:
        q.put_nowait(event)
