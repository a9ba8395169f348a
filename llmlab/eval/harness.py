"""``llmlab.evaluate``: run benchmark tasks on a model and return lm-eval-shaped results.

    results = llmlab.evaluate("smollm2", tasks=["arc_easy", "gsm8k"], limit=100)
    results["results"]["arc_easy"]  # {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": .., "n": 100}

Multiple-choice tasks are scored by log-likelihood (:mod:`llmlab.eval.loglik`, prefix trees), generative ones
through the engine (``llmlab.LLM``, continuous batching, greedy), HumanEval in the sandbox. ``limit`` takes
the first N records of each task (of each subject for MMLU), so runs are comparable. Records that do not
parse are counted (``malformed``) and listed in ``config["malformed"]`` with file:line; prompts longer than
the context are cut from the left and counted (``truncated``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from llmlab.errors import ConfigError
from llmlab.eval.gen_tasks import GEN_BUILDERS, GEN_METRICS, GenDoc, score_doc
from llmlab.eval.humaneval import STOP, check_completions, humaneval_metrics, load_problems
from llmlab.eval.loglik import encode_requests, score_groups
from llmlab.eval.mc_tasks import MC_BUILDERS, MC_METRICS, MCDoc
from llmlab.eval.metrics import mc_scores, mean_stderr
from llmlab.eval.task_list import TASKS, check_task_names
from llmlab.infer import LLM, SamplingParams
from llmlab.loading import load
from llmlab.model.transformer import Transformer


def _resolve(
    model_or_path: Any, tokenizer: Any, adapter: str | None
) -> tuple[nn.Module, Any, LLM | None, str]:
    if isinstance(model_or_path, LLM):
        return model_or_path.model, tokenizer or model_or_path.tokenizer, model_or_path, "LLM"
    if isinstance(model_or_path, nn.Module):
        if tokenizer is None:
            raise ConfigError("evaluate(model): pass the model's tokenizer as tokenizer=")
        return model_or_path, tokenizer, None, type(model_or_path).__name__
    if isinstance(model_or_path, (str, Path)):
        model, tok = load(model_or_path, adapter=adapter)
        if tok is None:
            raise ConfigError(f"{model_or_path}: checkpoint has no tokenizer; evaluation needs one")
        return model, tokenizer or tok, None, str(model_or_path)
    raise ConfigError(f"evaluate: expected a path, an LLM or a model, got {type(model_or_path).__name__}")


def _limit_docs(docs: list, limit: int | None) -> list:
    if limit is None:
        return docs
    if docs and getattr(docs[0], "group", None) is not None:  # MMLU: the first N of each subject
        seen: dict[str, int] = {}
        out = []
        for d in docs:
            if seen.get(d.group, 0) < limit:
                seen[d.group] = seen.get(d.group, 0) + 1
                out.append(d)
        return out
    return docs[:limit]


def _aggregate(rows: list[dict[str, float]], metrics: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in metrics:
        values = [r[m] for r in rows]
        out[m] = sum(values) / len(values) if values else float("nan")
        out[f"{m}_stderr"] = mean_stderr(values)
    out["n"] = len(rows)
    return out


def run_mc(
    name: str,
    model: nn.Module,
    tok: Any,
    docs: list[MCDoc],
    batch_size: int,
    progress: bool,
    log: list | None = None,
) -> dict:
    """Score ``docs`` and return ``{task: metrics}`` (MMLU adds one entry per subject and the averages).

    ``log``, when given, receives one ``{"where", "loglikelihoods", "gold"}`` per question."""
    pairs = [pair for d in docs for pair in d.requests]
    encoded = encode_requests(tok, pairs)
    groups, pos = [], 0
    for d in docs:
        groups.append(encoded[pos : pos + len(d.requests)])
        pos += len(d.requests)
    bar = tqdm(total=len(pairs), desc=name, unit="req", disable=not progress, file=sys.stderr)
    scores, stats = score_groups(model, groups, batch_size=batch_size, on_batch=bar.update)
    bar.close()
    rows = []
    for d, s in zip(docs, scores, strict=True):
        r = mc_scores([ll for ll, _ in s], d.choices, d.gold, d.n_true)
        if d.n_true is not None:
            r["acc"] = r["mc2"]  # lm-eval reports TruthfulQA MC2 under "acc"
        rows.append(r)
        if log is not None:
            log.append({"where": d.where, "loglikelihoods": [ll for ll, _ in s], "gold": d.gold})
    metrics = MC_METRICS[name]
    if name != "mmlu":
        res = _aggregate(rows, metrics)
    else:
        res, subjects = {}, {}
        for d, r in zip(docs, rows, strict=True):
            subjects.setdefault(d.group, []).append(r)
        per = {f"mmlu_{s}": _aggregate(rs, metrics) for s, rs in sorted(subjects.items())}
        macro = [v["acc"] for v in per.values()]
        res = {"acc": sum(macro) / len(macro), "acc_stderr": _aggregate(rows, metrics)["acc_stderr"],
               "acc_micro": _aggregate(rows, metrics)["acc"], "n": len(rows), "subjects": len(per)}  # fmt: skip
        res.update({"truncated": stats["truncated"], "requests_per_s": len(pairs) / stats["seconds"]})
        return {"mmlu": res, **per}
    res.update({"truncated": stats["truncated"], "requests_per_s": len(pairs) / max(stats["seconds"], 1e-9)})
    return {name: res}


def _engine(model: nn.Module, tok: Any, llm: LLM | None, batch_size: int) -> LLM:
    if llm is not None:
        return llm
    if not isinstance(model, Transformer):
        raise ConfigError("generative tasks need an llmlab model (they run on llmlab.LLM)")
    return LLM.from_model(model, tok, max_batch_size=batch_size)


def _prompt_ids(llm: LLM, prompts: list[Any], max_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids of each prompt, cut from the left to leave room for ``max_tokens``; and how many were cut."""
    room = (llm.max_model_len or 1 << 30) - max_tokens - 1
    out, cut = [], 0
    for p in prompts:
        _, ids = llm.encode_prompt(p)
        if len(ids) > room:
            ids, cut = ids[-room:], cut + 1
        out.append(ids)
    return out, cut


def _max_new(llm: LLM, wanted: int) -> int:
    """New tokens per request: the task's budget, but at most half a short context (the prompt needs room)."""
    return min(wanted, llm.max_model_len // 2) if llm.max_model_len else wanted


def run_generate(name: str, llm: LLM, docs: list[GenDoc], progress: bool) -> dict:
    max_tokens = _max_new(llm, max(d.max_tokens for d in docs))
    ids, cut = _prompt_ids(llm, [d.prompt for d in docs], max_tokens)
    params = [
        SamplingParams(temperature=0.0, max_tokens=min(d.max_tokens, max_tokens), stop=d.stop or None)
        for d in docs
    ]
    t0 = time.perf_counter()
    outs = llm.generate(ids, params, use_tqdm=progress)
    seconds = time.perf_counter() - t0
    rows = [score_doc(name, o.text, d) for o, d in zip(outs, docs, strict=True)]
    res = _aggregate(rows, GEN_METRICS[name])
    tokens = sum(len(o.token_ids) for o in outs)
    res.update({"truncated": cut, "tokens_per_s": tokens / max(seconds, 1e-9)})
    return {name: res}


def run_humaneval(llm: LLM, limit: int | None, samples: int, seed: int, progress: bool) -> tuple[dict, list]:
    problems, bad = load_problems()
    problems = problems[:limit] if limit is not None else problems
    greedy = samples == 1
    max_tokens = _max_new(llm, 384)
    prompts, params = [], []
    for _, p in problems:
        for j in range(samples):
            prompts.append(p["prompt"])
            params.append(SamplingParams(temperature=0.0 if greedy else 0.8, top_p=1.0 if greedy else 0.95,
                                         seed=None if greedy else seed + j, max_tokens=max_tokens, stop=STOP))  # fmt: skip
    ids, cut = _prompt_ids(llm, prompts, max_tokens)
    outs = llm.generate(ids, params, use_tqdm=progress)
    completions = [[outs[i * samples + j].text for j in range(samples)] for i in range(len(problems))]
    passed = check_completions([p for _, p in problems], completions)
    res = humaneval_metrics(passed)
    res.update({"n": len(problems), "samples": samples, "truncated": cut})
    return {"humaneval": res}, bad


def evaluate(
    model_or_path: Any,
    tasks: Sequence[str] = ("arc_easy",),
    limit: int | None = None,
    shots: int | None = None,
    batch_size: int = 16,
    chat: bool = False,
    progress: bool = True,
    *,
    tokenizer: Any = None,
    adapter: str | None = None,
    samples: int = 1,
    seed: int = 0,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate a model (path, loaded model with ``tokenizer=``, or an ``LLM``) on ``tasks``.

    ``shots`` overrides each task's default (MMLU 5 dev exemplars, GSM8K 5 train exemplars, or 0 with
    ``chat``); ``chat`` sends generative prompts through the chat template; ``samples`` is completions per
    HumanEval problem (pass@k for every k <= samples); ``log_samples`` adds ``"samples": {task: [per-question
    log-likelihoods]}`` for multiple-choice tasks (as lm-eval's ``--log_samples``). Returns ``{"results": {task: {metric: value,
    metric + "_stderr": .., "n": int, ...}}, "config": {...}}`` with values as fractions in [0, 1].
    """
    tasks = check_task_names(tasks)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    if batch_size < 1 or samples < 1:
        raise ConfigError("batch_size and samples must be at least 1")
    # Build every task's records first: bad options (--shots past a pool) fail before the model loads.
    built: dict[str, tuple[list, list]] = {}
    for name in tasks:
        kind = TASKS[name].kind
        if kind == "mc":
            built[name] = MC_BUILDERS[name](shots)
        elif kind == "generate":
            built[name] = GEN_BUILDERS[name](shots, chat)
        elif shots:
            raise ConfigError("--shots: humaneval is zero-shot (the prompt is the function to complete)")
    model, tok, llm, model_name = _resolve(model_or_path, tokenizer, adapter)
    results: dict[str, Any] = {}
    malformed: dict[str, list[str]] = {}
    logged: dict[str, list] = {}
    t0 = time.perf_counter()
    for name in tasks:
        kind = TASKS[name].kind
        if kind == "mc":
            docs, bad = built[name]
            log = logged.setdefault(name, []) if log_samples else None
            results.update(run_mc(name, model, tok, _limit_docs(docs, limit), batch_size, progress, log))
        elif kind == "generate":
            docs, bad = built[name]
            llm = _engine(model, tok, llm, batch_size)
            results.update(run_generate(name, llm, _limit_docs(docs, limit), progress))
        else:
            llm = _engine(model, tok, llm, batch_size)
            out, bad = run_humaneval(llm, limit, samples, seed, progress)
            results.update(out)
        results[name]["malformed"] = len(bad)
        if bad:
            malformed[name] = [str(b) for b in bad[:20]]
            print(
                f"warning: {name}: {len(bad)} malformed record(s) skipped, first: {bad[0]}", file=sys.stderr
            )
    config = {
        "model": model_name,
        "tasks": list(tasks),
        "limit": limit,
        "shots": shots,
        "batch_size": batch_size,
        "chat": chat,
        "samples": samples,
        "seconds": time.perf_counter() - t0,
        "malformed": malformed,
    }
    return {"results": results, "config": config, **({"samples": logged} if log_samples else {})}


def format_table(results: dict[str, Any]) -> str:
    """The readable table: task, metric, value, ± stderr, n (MMLU subjects after the averages)."""
    lines = [f"{'task':<34} {'metric':<22} {'value':>8} {'± stderr':>10} {'n':>6}"]
    skip = {
        "n",
        "truncated",
        "malformed",
        "requests_per_s",
        "tokens_per_s",
        "subjects",
        "samples",
        "isolation",
    }
    for task, res in results.get("results", results).items():
        for metric, value in res.items():
            if metric in skip or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = res.get(f"{metric}_stderr")
            err_s = f"{err:.4f}" if isinstance(err, float) and err == err else "-"
            lines.append(f"{task:<34} {metric:<22} {value:>8.4f} {err_s:>10} {res.get('n', ''):>6}")
    return "\n".join(lines)
