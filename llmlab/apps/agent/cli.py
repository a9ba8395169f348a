"""``llmlab agent MODEL "task"``: a tool-using agent over the engine (or an OpenAI-compatible server).

Import-light: torch, the engine and the tools load inside the handler.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "agent",
        help="solve a task with tools (calculator, unit_convert, python sandbox, read_file, rag_search)",
        description=(
            "Run a tool-using agent on TASK with MODEL (anything `llmlab.load` accepts, 'smollm2' included). "
            "Modes: native OpenAI-style tool calls (default), react (Thought/Action/Observation text), plan "
            "(plan-and-execute). --json prints {answer, steps, finish_reason, ...}."
        ),
    )
    p.add_argument("model", help="model path or 'smollm2' (with --server: the served model's name)")
    p.add_argument("task", help="the task, in words")
    p.add_argument(
        "--tools",
        default="calculator,unit_convert,python",
        help="comma-separated tools: calculator, unit_convert, python, read_file, rag_search ('' for none)",
    )
    p.add_argument(
        "--mode", choices=["native", "react", "plan"], default="native", help="agent loop (default native)"
    )
    p.add_argument(
        "--constrained",
        action="store_true",
        help="every turn is one grammar-constrained tool call (final_answer ends)",
    )
    p.add_argument("--max-steps", type=int, default=6, help="tool steps before giving up (default 6)")
    p.add_argument(
        "--token-budget", type=int, default=16000, help="prompt+completion tokens per run (default 16000)"
    )
    p.add_argument("--max-tokens", type=int, default=200, help="tokens per model turn (default 200)")
    p.add_argument("--workspace", default=None, help="directory read_file may read (default: none)")
    p.add_argument(
        "--index", default=None, help="index for rag_search (built by `llmlab rag index DIR --out INDEX`)"
    )
    p.add_argument(
        "--server", default=None, help="OpenAI-compatible server URL instead of loading MODEL here"
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds a tool may run (default 10)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_agent)


def _agent(args: argparse.Namespace) -> int:
    import json

    from llmlab.apps.agent.loop import Agent, AgentConfig
    from llmlab.apps.agent.tools import make_tools
    from llmlab.errors import LLMLabError
    from llmlab.eval.sandbox import isolation, isolation_report

    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    for flag in ("max_steps", "token_budget", "max_tokens"):
        if getattr(args, flag) < 1:
            raise LLMLabError(f"--{flag.replace('_', '-')} must be at least 1")
    retriever = None
    if "rag_search" in names:
        if not args.index:
            raise LLMLabError(
                "tool rag_search needs --index INDEX (build one with `llmlab rag index DIR --out INDEX`)"
            )
        from llmlab.apps.agent.rag import (
            IndexRetriever,
        )  # the RAG stack (embedder, faiss) only when asked for

        retriever = IndexRetriever(args.index)
    tools = make_tools(names, workspace=args.workspace, retriever=retriever, timeout_s=args.timeout)
    if args.server:
        from llmlab.apps.agent.policy import ServerPolicy

        policy = ServerPolicy(args.server, args.model, max_context=args.max_model_len or 2048)
    else:
        from llmlab.apps.agent.policy import EnginePolicy
        from llmlab.infer import LLM
        from llmlab.loading import resolve_model_path

        policy = EnginePolicy(LLM(resolve_model_path(args.model), max_model_len=args.max_model_len))
    config = AgentConfig(
        mode=args.mode,
        constrained=args.constrained,
        max_steps=args.max_steps,
        token_budget=args.token_budget,
        max_tokens=args.max_tokens,
    )
    result = Agent(policy, tools, config).run(args.task)
    if args.json:
        out = result.to_json()
        if "python" in names:
            out["sandbox"] = isolation()
        print(json.dumps(out, indent=2))
        return 0
    if "python" in names:
        print(f"[python sandbox: {isolation_report()}]")
    for i, step in enumerate(result.steps, 1):
        print(f"step {i}: {step.tool}({json.dumps(step.arguments)[:200]})\n  -> {step.observation[:300]}")
    if result.message:
        print(f"[{result.finish_reason}: {result.message}]")
    print(f"answer: {result.answer}")
    return 0
