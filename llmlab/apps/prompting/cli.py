"""``llmlab prompt``: ask with a prompting technique, or measure the techniques against each other.

    llmlab prompt MODEL "question" [--technique zero|fewshot|cot|fewshot-cot|self-consistency] [--k K] [--n N]
                  [--select random|similar] [--json-schema FILE] [--json]
    llmlab prompt eval MODEL [--tasks svamp,multiarith,addsub,singleeq,task_suite] [--techniques ...]
                  [--limit N] [--n 1,5,10] [--sc-limit N] [--json-task] [--out F.json]

(``llmlab prompt ask MODEL "question"`` is the long form of the first.) Heavy imports stay in the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llmlab.errors import ConfigError
from llmlab.outputs import add_output_argument

TECHNIQUES = ("zero", "fewshot", "cot", "fewshot-cot", "self-consistency")  # == builders.TECHNIQUES
DEFAULT_TASKS = "svamp,multiarith,addsub,singleeq"


class _AskByDefault(argparse._SubParsersAction):
    """Sub-commands where any first word that is not one (a model path) means ``ask``:
    ``llmlab prompt MODEL "q"`` is ``llmlab prompt ask MODEL "q"``."""

    class _AnyName(dict):
        def __contains__(self, name: object) -> bool:  # argparse checks the first word against the choices
            return True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.choices = self._AnyName()  # listed nowhere (metavar is set): only membership is asked

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        if values and values[0] not in self._name_parser_map:
            values = ["ask", *values]
        super().__call__(parser, namespace, values, option_string)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", metavar="MODEL", help="llmlab checkpoint dir, HF dir, .gguf file, run dir or 'smollm2'"
    )
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--int8", action="store_true", help="int8 weights on the fused decode path")
    quant.add_argument("--int4", action="store_true", help="int4 weights on the fused decode path")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together (default 32)")
    p.add_argument("--seed", type=int, default=0, help="exemplar draw and sampling seed (default 0)")
    p.add_argument("--select", choices=["random", "similar"], default="random",
                   help="few-shot exemplars: a seeded random draw, or the most similar by MiniLM embedding")  # fmt: skip
    p.add_argument("--k", type=int, default=4, help="few-shot exemplars (default 4)")
    p.add_argument(
        "--temperature", type=float, default=0.7, help="self-consistency sampling temperature (0.7)"
    )


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "prompt",
        help="prompting techniques: few-shot, chain of thought, self-consistency, JSON output; and their eval",
        description="Ask MODEL a question with a prompting technique ('llmlab prompt MODEL \"question\"'), or "
        "measure the techniques against each other ('llmlab prompt eval MODEL').",
    )
    sub = parser.add_subparsers(dest="prompt_command", metavar="{ask (default),eval}", action=_AskByDefault)
    parser.set_defaults(func=lambda args: _usage(parser))

    ask = sub.add_parser("ask", help="answer one question (the default: 'llmlab prompt MODEL \"q\"')",
                         description="Answer QUESTION with one prompting technique; print the answer.")  # fmt: skip
    _add_engine_args(ask)
    ask.add_argument("question", metavar="QUESTION", help="the question (or '-' to read it from stdin)")
    ask.add_argument(
        "--technique", choices=TECHNIQUES, default="zero", help="prompting technique (default zero)"
    )
    ask.add_argument("--n", type=int, default=5, help="self-consistency samples (default 5)")
    ask.add_argument("--pool", choices=["gsm8k", "suite"], default="gsm8k",
                     help="few-shot exemplar pool: GSM8K train solutions, or the task suite's train split")  # fmt: skip
    ask.add_argument("--system", default=None, help="system message")
    ask.add_argument(
        "--instruction", default="", help="text appended to the question (e.g. an answer format)"
    )
    ask.add_argument("--json-schema", default=None, metavar="FILE",
                     help="constrain the reply to this JSON schema (the server's constrained decoder)")  # fmt: skip
    ask.add_argument("--max-tokens", type=int, default=None, help="reply length limit (default 128; CoT 256)")
    ask.add_argument("--show-prompt", action="store_true", help="print the rendered prompt first")
    ask.add_argument("--json", action="store_true", help="print the whole result as one JSON object")
    ask.set_defaults(func=run_ask)

    ev = sub.add_parser("eval", help="accuracy (95%% CI) and tokens per correct answer of each technique",
                        description="Score prompting techniques on math word problems and the task suite: "
                        "accuracy with 95% Wilson intervals, unparsed replies, tokens per correct answer; "
                        "with --json-task also the JSON parse-failure rate with and without constrained "
                        "decoding.")  # fmt: skip
    _add_engine_args(ev)
    ev.add_argument(
        "--tasks", default=DEFAULT_TASKS, help=f"comma list (default {DEFAULT_TASKS}; also task_suite)"
    )
    ev.add_argument("--techniques", default="zero,fewshot,cot,fewshot-cot,self-consistency",
                    help="comma list of techniques (default: all five)")  # fmt: skip
    ev.add_argument("--limit", type=int, default=50, help="questions per task (default 50)")
    ev.add_argument(
        "--n", default="1,5,10", help="self-consistency sample counts, comma list (default 1,5,10)"
    )
    ev.add_argument("--sc-limit", type=int, default=None, help="questions per task for self-consistency "
                    "(default: --limit)")  # fmt: skip
    ev.add_argument("--cot-max-tokens", type=int, default=192, help="reasoning length limit (default 192)")
    ev.add_argument(
        "--json-task", action="store_true", help="also the JSON parse-failure rate, free vs constrained"
    )
    ev.add_argument("--progress", action="store_true", help="progress bars")
    add_output_argument(ev, "write the result as JSON to this file", kind="file", required=False)
    ev.set_defaults(func=run_eval)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _check_counts(args: argparse.Namespace) -> None:
    if args.k < 0:
        raise ConfigError(f"--k {args.k}: the number of exemplars cannot be negative")
    if args.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size {args.max_batch_size}: must be at least 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: must be >= 0")


def _engine(args: argparse.Namespace) -> Any:
    import torch

    from llmlab.infer import LLM
    from llmlab.loading import resolve_model_path

    torch.set_num_threads(min(2, torch.get_num_threads()))
    fast: Any = "int8" if args.int8 else "int4" if args.int4 else True
    return LLM(
        resolve_model_path(args.model),
        max_batch_size=args.max_batch_size,
        kv_cache_mb=1024.0,
        fast=fast,
        enable_prefix_caching=True,  # fixed few-shot exemplars: one shared prompt prefix
    )


def _embedder(args: argparse.Namespace) -> Any:
    if args.select != "similar":
        return None
    from llmlab.apps.embeddings import load_embedder  # all-MiniLM-L6-v2, loaded only when asked for

    return load_embedder().embed


def run_ask(args: argparse.Namespace) -> int:
    _check_counts(args)
    if args.n < 1:
        raise ConfigError(f"--n {args.n}: self-consistency needs at least one sample")
    question = sys.stdin.read() if args.question == "-" else args.question
    if not question.strip():
        raise ConfigError("QUESTION is empty")
    schema = None
    if args.json_schema:
        from llmlab.apps.prompting.structured import read_schema

        schema = read_schema(args.json_schema)
    from llmlab.apps.prompting.ask import ask

    result = ask(_engine(args), question, args.technique, k=args.k, n=args.n, selection=args.select,
                 pool=args.pool, embed=_embedder(args), schema=schema, system=args.system,
                 instruction=args.instruction, temperature=args.temperature, max_tokens=args.max_tokens,
                 seed=args.seed)  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if args.show_prompt:
        print(result["prompt"], end="\n---\n")
    if "samples" in result:
        for i, text in enumerate(result["samples"]):
            print(f"[sample {i + 1}] {text.strip()}\n")
        print(
            f"answer: {result['answer']}  ({result['votes']}/{result['n']} votes, margin {result['margin']})"
        )
    elif schema is not None:
        print(result["text"] if result["error"] is None else f"{result['text']}\n(error: {result['error']})")
    else:
        print(result["text"].strip())
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what} {text!r}: expected a comma list of integers") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--{what} {text!r}: expected positive integers")
    return values


def run_eval(args: argparse.Namespace) -> int:
    _check_counts(args)
    from llmlab.apps.prompting.evaluate import (
        ALL_TASKS,
        evaluate_json,
        evaluate_prompting,
        format_cells,
        parse_list,
    )

    tasks = parse_list(args.tasks, ALL_TASKS, "tasks")
    techniques = parse_list(args.techniques, TECHNIQUES, "techniques")
    n_values = _int_list(args.n, "n")
    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: score at least one question")
    llm = _engine(args)
    result = evaluate_prompting(llm, tasks, techniques, limit=args.limit, k=args.k, selection=args.select,
                                embed=_embedder(args), sc_samples=n_values, sc_limit=args.sc_limit,
                                temperature=args.temperature, cot_max_tokens=args.cot_max_tokens, seed=args.seed,
                                progress=args.progress)  # fmt: skip
    result["config"]["model"] = args.model
    print(format_cells(result))
    if args.json_task:
        result["json_task"] = evaluate_json(llm, args.limit)
        for mode, row in result["json_task"].items():
            lo, hi = row["parse_failure_ci95"]
            print(f"json task ({mode}): parse failures {row['parse_failure_rate']:.3f} [{lo:.3f}, {hi:.3f}] "
                  f"of n={row['n']} (not JSON {row['not_json']}, off-schema {row['off_schema']}), "
                  f"correct {row['correct']}")  # fmt: skip
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0
