"""``llmlab generate`` (prompts file -> JSONL) and ``llmlab chat`` (streamed terminal chat).

Import-light: torch and the engine load inside the handlers.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

from llmlab.cliargs import add_override_arguments, overrides_from
from llmlab.config import set_key
from llmlab.errors import DataError, LLMLabError
from llmlab.outputs import add_output_argument


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", help="llmlab checkpoint dir, run dir, Hugging Face model dir, .gguf file, or 'smollm2'"
    )
    p.add_argument("--adapter", default=None, help="LoRA adapter dir to apply on top of the model")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype (default: as saved)"
    )
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument(
        "--kv-cache-mb", type=float, default=256.0, help="paged KV cache pool size (default 256 MiB)"
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument(
        "--rope-scaling",
        default=None,
        metavar="TYPE:FACTOR",
        help="run past the trained context, e.g. yarn:4",
    )
    p.add_argument("--sliding-window", type=int, default=None, help="attend only to the last N tokens")
    p.add_argument(
        "--attention-sinks", default=None, metavar="S,W", help="StreamingLLM: keep S first + W recent tokens"
    )
    p.add_argument(
        "--speculative",
        default=None,
        choices=["ngram", "draft", "medusa"],
        help="speculative decoding proposer",
    )
    p.add_argument("--draft-model", default=None, help="draft model path for --speculative draft")
    p.add_argument(
        "--medusa-heads", default=None, help="heads dir ('llmlab medusa') for --speculative medusa"
    )
    p.add_argument(
        "--num-speculative-tokens", type=int, default=4, help="tokens drafted per step (default 4)"
    )
    p.add_argument(
        "--no-fast", action="store_true", help="use the model's plain forward instead of the fused path"
    )
    quant = p.add_mutually_exclusive_group()
    quant.add_argument(
        "--int8",
        action="store_true",
        help="int8 weights on the fused path (faster batch-1 decode, not bit-exact)",
    )
    quant.add_argument(
        "--int4", action="store_true", help="int4 weights on the fused path (fastest decode, not bit-exact)"
    )


def _add_sampling_args(p: argparse.ArgumentParser, preset: str) -> None:
    d = SAMPLING_DEFAULTS[preset]
    g = p.add_argument_group(
        "sampling",
        f"defaults: the '{preset}' preset (temperature {d['temperature']}, top-p {d['top_p']}, "
        f"max tokens {d['max_tokens']}); a reply cut at max tokens is reported",
    )
    g.add_argument(
        "--preset", default=None, help=f"sampling preset: greedy, sample, creative (default: {preset})"
    )
    g.add_argument("--config", default=None, help="YAML file of SamplingParams keys")
    g.add_argument("--temperature", type=float, default=None, help=f"0 = greedy (default {d['temperature']})")
    g.add_argument("--top-p", type=float, default=None, help=f"(default {d['top_p']})")
    g.add_argument("--top-k", type=int, default=None, help="(default 0: off)")
    g.add_argument("--min-p", type=float, default=None, help="(default 0: off)")
    g.add_argument(
        "--max-tokens", type=int, default=None, help=f"tokens per reply (default {d['max_tokens']})"
    )
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="(default 1.0: off)")
    g.add_argument("--presence-penalty", type=float, default=None, help="(default 0)")
    g.add_argument("--frequency-penalty", type=float, default=None, help="(default 0)")
    g.add_argument("--logprobs", action="store_true", help="return each chosen token's log-probability")
    add_override_arguments(p, "SamplingParams overrides key=value, e.g. top_k=40")


# The presets' values shown in --help (kept in step with llmlab.infer.sampling.SAMPLING_PRESETS by a test).
SAMPLING_DEFAULTS = {
    "greedy": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 32},
    "sample": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 256},
}

_FLAG_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "stop",
    "repetition_penalty", "presence_penalty", "frequency_penalty",
)  # fmt: skip


def build_sampling(args: argparse.Namespace, default_preset: str = "greedy") -> Any:
    """Preset, then --config YAML, then key=value overrides, then explicit flags."""
    from llmlab.config import build_config
    from llmlab.infer.sampling import SAMPLING_PRESETS, SamplingParams

    params = build_config(
        SamplingParams, SAMPLING_PRESETS, args.preset or default_preset, args.config, overrides_from(args)
    )
    for key in _FLAG_KEYS:
        value = getattr(args, key)
        if value is not None:
            setattr(params, key, value)
    if args.logprobs:
        params.logprobs = True
    params.validate()
    return params


def build_llm(args: argparse.Namespace) -> Any:
    from llmlab.infer import LLM  # torch: loaded with the command, not with --help

    return LLM(args.model, **llm_options(args))


def llm_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options of the model flags (``--int8``/``--int4`` choose the fused quantized path)."""
    opts: dict[str, Any] = {
        "max_batch_size": args.max_batch_size,
        "kv_cache_mb": args.kv_cache_mb,
        "max_model_len": args.max_model_len,
        "sliding_window": args.sliding_window,
        "fast": False if args.no_fast else ("int8" if args.int8 else "int4" if args.int4 else True),
        "dtype": args.dtype,
        "adapter": args.adapter,
    }
    if args.rope_scaling:
        kind, _, factor = args.rope_scaling.partition(":")
        try:
            opts["rope_scaling"] = {"type": kind, "factor": float(factor or 1.0)}
        except ValueError as exc:
            raise LLMLabError(
                f"--rope-scaling must look like TYPE:FACTOR (e.g. yarn:4), got {args.rope_scaling!r}"
            ) from exc
    if args.attention_sinks:
        try:
            s, w = (int(x) for x in args.attention_sinks.split(","))
        except ValueError as exc:
            raise LLMLabError(
                f"--attention-sinks must look like S,W (e.g. 4,256), got {args.attention_sinks!r}"
            ) from exc
        opts["attention_sinks"] = (s, w)
    if args.speculative:
        opts["speculative"] = {
            "method": args.speculative,
            "draft_model": args.draft_model,
            "heads": args.medusa_heads,
            "num_tokens": args.num_speculative_tokens,
        }
    return opts


# Keys a --prompts JSONL record may carry besides its sampling fields.
RECORD_KEYS = ("prompt", "messages", "id")


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """``.txt``: one prompt per line (blank lines skipped); ``.jsonl``: records with ``"prompt"`` (text) or
    ``"messages"`` (a chat), an optional ``"id"`` carried to the output, and optional SamplingParams fields
    (``temperature``, ``max_tokens``, ...) for that prompt alone; any other key is an error naming the line.

    Returns ``[{"prompt": text-or-messages, "id": ..., "sampling": {field: value}}]``.
    """
    from llmlab.infer.sampling import SamplingParams  # torch: loaded with the command, not with --help

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    sampling_keys = set(SamplingParams().to_dict()) if path.suffix == ".jsonl" else set()
    records: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            records.append({"prompt": line, "sampling": {}})
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            prompt: Any = rec["prompt"]
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            prompt = rec["messages"]
            if not all(
                isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in prompt
            ):
                raise DataError(f"{path}:{n}: every message needs 'role' and string 'content'")
        else:
            raise DataError(f"{path}:{n}: record needs a string 'prompt' or a list 'messages'")
        unknown = [k for k in rec if k not in RECORD_KEYS and k not in sampling_keys]
        if unknown:
            raise DataError(
                f"{path}:{n}: unknown key '{unknown[0]}' (a record holds prompt or messages, id, and "
                "SamplingParams fields such as temperature or max_tokens)"
            )
        row = {"prompt": prompt, "sampling": {k: v for k, v in rec.items() if k in sampling_keys}}
        if "id" in rec:
            row["id"] = rec["id"]
        records.append(row)
    if not records:
        raise DataError(f"{path}: no prompts")
    return records


def record_params(base: Any, sampling: dict[str, Any], where: str) -> Any:
    """``base`` with a record's own sampling fields set (validated; the error names ``where``)."""
    if not sampling:
        return base
    params = copy.deepcopy(base)
    try:
        for key, value in sampling.items():
            set_key(params, key, value)
        params.validate()
    except LLMLabError as exc:
        raise DataError(f"{where}: {exc}") from exc
    return params


def register(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser(
        "generate",
        help="generate completions for a file of prompts (JSONL out)",
        description="Generate for every prompt with continuous batching; writes one JSON object per prompt.",
    )
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompts",
        help=".txt (one prompt per line) or .jsonl ('prompt' or 'messages'; optional 'id', carried to the output, and sampling fields such as max_tokens for that prompt)",
    )
    src.add_argument("--prompt", action="append", help="a prompt on the command line (repeatable)")
    add_output_argument(g, "output .jsonl (default: stdout)", required=False, kind="file")
    _add_sampling_args(g, "greedy")
    g.set_defaults(func=_generate)

    c = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal (streamed)",
        description="Multi-turn terminal chat. Commands: /reset, /system TEXT, /exit.",
    )
    _add_model_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(c, "sample")
    c.set_defaults(func=_chat)


def _generate(args: argparse.Namespace) -> int:
    records = (
        read_prompts(args.prompts) if args.prompts else [{"prompt": p, "sampling": {}} for p in args.prompt]
    )
    params = build_sampling(args)
    where = args.prompts or "--prompt"
    per_prompt = [
        record_params(params, r["sampling"], f"{where}: prompt {i + 1}") for i, r in enumerate(records)
    ]
    llm = build_llm(args)
    t0 = time.perf_counter()
    outs = llm.generate([r["prompt"] for r in records], per_prompt, use_tqdm=sys.stderr.isatty())
    elapsed = time.perf_counter() - t0
    ntok = sum(len(o.token_ids) for o in outs)
    rows = []
    for rec, o in zip(records, outs, strict=True):
        row: dict[str, Any] = {"id": rec["id"]} if "id" in rec else {}
        row.update(prompt=rec["prompt"], text=o.text, token_ids=o.token_ids, finish_reason=o.finish_reason)
        if o.logprobs is not None:
            row["logprobs"] = o.logprobs
        rows.append(json.dumps(row, ensure_ascii=False))
    text = "\n".join(rows) + "\n"
    if args.out:
        from llmlab.model.checkpoint import atomic_write_file  # torch: loaded with the command

        atomic_write_file(args.out, lambda p: p.write_text(text, encoding="utf-8"))
    else:
        sys.stdout.write(text)
    print(
        f"{len(outs)} prompts, {ntok} tokens in {elapsed:.1f}s ({ntok / max(elapsed, 1e-9):.1f} tok/s)",
        file=sys.stderr,
    )
    cut = sum(o.finish_reason == "length" for o in outs)
    if cut:
        limits = sorted({p.max_tokens for p, o in zip(per_prompt, outs) if o.finish_reason == "length"})
        print(
            f"{cut} of {len(outs)} outputs were cut at the max_tokens limit ({', '.join(map(str, limits))}); "
            "raise it with --max-tokens",
            file=sys.stderr,
        )
    mem = llm.memory_report()
    print(
        f"KV cache: {mem['kv_bytes_per_token']} bytes/token = 2 x {mem['layers']} layers x {mem['kv_heads']} kv heads"
        f" x {mem['head_dim']} head dim x dtype bytes (allocated {mem['kv_bytes_per_token_measured']:.0f}/token,"
        f" pool {mem['kv_pool_bytes'] / 2**20:.1f} MiB)",
        file=sys.stderr,
    )
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llmlab.infer.chat import run_chat

    params = build_sampling(args, default_preset="sample")
    llm = build_llm(args)
    return run_chat(llm, params, args.system)
