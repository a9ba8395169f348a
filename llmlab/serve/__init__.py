"""Serving: ``llmlab serve``, an OpenAI-compatible HTTP server over the one engine (:class:`llmlab.LLM`).

- :mod:`~llmlab.serve.protocol`: request bodies (pydantic) and OpenAI's error shape;
- :mod:`~llmlab.serve.openai_api`: request -> prompt ids + ``SamplingParams`` (limits, grammars);
- :mod:`~llmlab.serve.responses`: outputs -> response bodies and SSE chunks;
- :mod:`~llmlab.serve.tools`: tool definitions in the prompt, ``<tool_call>`` parsing;
- :mod:`~llmlab.serve.engine_thread`: the thread that owns the engines; handlers only queue and read;
- :mod:`~llmlab.serve.metrics`: ``/metrics`` (Prometheus, vLLM's names with ``llmlab:``);
- :mod:`~llmlab.serve.app`: the FastAPI app; :mod:`~llmlab.serve.server`: models, startup, in-process server;
- the chat page lives in ``llmlab/assets/serve/`` (plain HTML/JS/CSS, no build step).
"""
