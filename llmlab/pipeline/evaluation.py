"""The eval stage: every stage's model on the same held-out tasks, text and prompts.

Per model (the base when the pipeline starts from one, each policy stage, each quantized copy):

- **tasks**: greedy answers to held-out verifiable problems (``llmlab.align.rollout``'s verifier), exact
  match and format rate overall and per task;
- **heldout_text**: bits per byte on held-out text (the data stage's val split), next to ``gzip -9`` and
  ``xz -9e`` on the same bytes;
- **winrate**: against the baseline stage (the SFT model): a win is a problem this model answers right and the
  baseline wrong; win rate = wins / (wins + losses), with its 95% Wilson interval; with a reward-model stage
  also the reward model's verdict on the same answers (``llmlab.eval.winrate``: mean sigmoid(r_A - r_B), CI);
- **samples**: greedy answers to the fixed sample prompts (the report shows them side by side);
- the evaluation harness's tasks (``llmlab.eval.evaluate``) when ``eval.harness_tasks`` names some.

``DIR/eval/metrics.json`` holds ``{stage: {"results": {task: {metric: value}}, "config": {...}}}``, the harness's
JSON shape per stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmlab.eval.metrics import wilson_interval
from llmlab.pipeline.config import MODEL_STAGES

if TYPE_CHECKING:
    from llmlab.pipeline.config import PipelineConfig

METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.json"


def win_rate(mine: list[bool], theirs: list[bool]) -> dict[str, float]:
    """Pairwise verdicts on the same problems: wins, losses, ties, rate over decided ones, Wilson CI."""
    wins = sum(a and not b for a, b in zip(mine, theirs, strict=True))
    losses = sum(b and not a for a, b in zip(mine, theirs, strict=True))
    lo, hi = wilson_interval(wins, wins + losses)
    rate = wins / (wins + losses) if wins + losses else 0.5
    return {"win_rate": rate, "ci_low": lo, "ci_high": hi, "wins": wins, "losses": losses,
            "ties": len(mine) - wins - losses}  # fmt: skip


def evaluated_models(cfg: PipelineConfig, root: Path) -> list[tuple[str, str]]:
    """``(name, path)`` of every model the pipeline made (and its base), in pipeline order."""
    models = [("base", cfg.base)] if cfg.base else []
    models += [(s, str(root / s / "final")) for s in MODEL_STAGES if s in cfg.stages]
    if "quantize" in cfg.stages:
        models += [(f"quantize-{q}", str(root / "quantize" / q)) for q in cfg.quantize.schemes]
    return models


def heldout_text(cfg: PipelineConfig, root: Path) -> tuple[str, dict[str, float]]:
    """The held-out text for bits per byte and the compressors' bits per byte on it."""
    from llmlab.data.corpora import load_corpus
    from llmlab.data.prepare import VAL_TEXT_FILE, compression_baselines

    val = root / "data" / VAL_TEXT_FILE
    if cfg.eval.text_corpus == "auto" and val.is_file():
        text = val.read_text(encoding="utf-8")
    else:
        corpus = "wikitext2-test" if cfg.eval.text_corpus == "auto" else cfg.eval.text_corpus
        text = "\n".join(load_corpus(corpus))
    if cfg.eval.text_tokens:
        text = text[: cfg.eval.text_tokens * 6]  # ~4 bytes a token: enough characters for text_tokens tokens
    return text, compression_baselines(text.encode("utf-8"))


def evaluate_model(cfg: PipelineConfig, path: str, problems: list[Any], text: str) -> dict[str, Any]:
    """Tasks, held-out bits per byte and samples of one model (see the module docstring)."""
    import torch

    from llmlab.align.rollout import score_completion
    from llmlab.eval.perplexity import evaluate_perplexity
    from llmlab.infer import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(path, max_batch_size=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=cfg.eval.max_new_tokens)
    outs = llm.generate([p.prompt for p in problems], greedy)
    verdicts = [score_completion(p, o.text) for p, o in zip(problems, outs)]
    tasks: dict[str, float] = {
        "exact_match": sum(c for c, _ in verdicts) / max(len(verdicts), 1),
        "format_ok": sum(f for _, f in verdicts) / max(len(verdicts), 1),
    }
    for name in sorted({p.task for p in problems}):
        mine = [c for p, (c, _) in zip(problems, verdicts) if p.task == name]
        tasks[f"exact_match/{name}"] = sum(mine) / len(mine)
    model = llm.model
    seq_len = min(256, getattr(model.cfg, "max_seq_len", 256))
    with torch.no_grad():
        ppl = evaluate_perplexity(
            model, llm.tokenizer, text, seq_len=seq_len, max_tokens=cfg.eval.text_tokens
        )
    harness = harness_results(cfg, llm)
    sample_params = SamplingParams(temperature=0.0, max_tokens=48, repetition_penalty=1.1)
    samples = llm.generate([[{"role": "user", "content": q}] for q in cfg.eval.sample_prompts], sample_params)
    return {
        "tasks": tasks,
        "correct": [c for c, _ in verdicts],
        "answers": [o.text.strip() for o in outs],
        "heldout_text": {"bits_per_byte": ppl["bits_per_byte"], "ppl": ppl["ppl"], "tokens": ppl["tokens"]},
        "samples": [" ".join(o.text.split()) for o in samples],
        "harness": harness,
        "seconds": time.perf_counter() - t0,
    }


def harness_results(cfg: PipelineConfig, llm: Any) -> dict[str, Any]:
    """``llmlab.eval.evaluate``'s results for ``eval.harness_tasks`` (empty when none are asked for)."""
    if not cfg.eval.harness_tasks:
        return {}
    from llmlab.eval import evaluate

    tasks = list(cfg.eval.harness_tasks)
    return evaluate(llm, tasks=tasks, limit=cfg.eval.harness_limit, chat=True, progress=False)["results"]


def judged_winrate(judge: Path, problems: list[Any], mine: list[str], theirs: list[str]) -> dict[str, Any]:
    """The reward model's verdict on the same greedy answers (``llmlab.eval.winrate``, order-free)."""
    from llmlab.eval import winrate

    prompts = [p.prompt[-1]["content"] for p in problems]
    res = winrate(None, None, str(judge), prompts, answers_a=mine, answers_b=theirs)
    return {k: res[k] for k in ("winrate", "winrate_stderr", "winrate_ci95", "n", "judge") if k in res}


def run_eval(cfg: PipelineConfig, root: Path, out: Path, resume: bool) -> dict[str, Any]:
    from llmlab.align.rollout import load_problems
    from llmlab.train.logging import jsonable

    problems = load_problems(cfg.eval.task_source, "test", cfg.eval.n_tasks, seed=0)
    text, compressors = heldout_text(cfg, root)
    from tqdm.auto import tqdm

    per_model: dict[str, dict[str, Any]] = {}
    for name, path in tqdm(evaluated_models(cfg, root), desc="eval", unit="model", dynamic_ncols=True):
        per_model[name] = {**evaluate_model(cfg, path, problems, text), "path": path}
        print(
            f"[eval] {name}: exact match {per_model[name]['tasks']['exact_match']:.3f}, "
            f"{per_model[name]['heldout_text']['bits_per_byte']:.3f} bits/byte",
            flush=True,
        )
    baseline = per_model.get(cfg.eval.winrate_baseline)
    names = list(per_model)
    later = set(names[names.index(cfg.eval.winrate_baseline) + 1 :]) if baseline is not None else set()
    metrics: dict[str, Any] = {}
    for name, res in per_model.items():
        results: dict[str, Any] = {
            "tasks": res["tasks"],
            "heldout_text": {**res["heldout_text"], **{f"{k}_bpb": v for k, v in compressors.items()}},
        }
        if name in later:  # the stages made from the baseline (and their quantized copies)
            results[f"winrate_vs_{cfg.eval.winrate_baseline}"] = win_rate(res["correct"], baseline["correct"])
            judge = root / "rm" / "final"
            if "rm" in cfg.stages and judge.is_dir():
                results[f"rm_winrate_vs_{cfg.eval.winrate_baseline}"] = judged_winrate(
                    judge, problems, res["answers"], baseline["answers"]
                )
        results.update(res["harness"])
        metrics[name] = {
            "results": results,
            "config": {
                "model": res["path"],
                "task_source": cfg.eval.task_source,
                "n_tasks": len(problems),
                "max_new_tokens": cfg.eval.max_new_tokens,
                "greedy": True,
                "seconds": res["seconds"],
            },
        }
    (out / METRICS_FILE).write_text(json.dumps(jsonable(metrics), indent=2), encoding="utf-8")
    samples = {"prompts": cfg.eval.sample_prompts, "answers": {n: r["samples"] for n, r in per_model.items()}}
    (out / SAMPLES_FILE).write_text(json.dumps(samples, indent=2), encoding="utf-8")
    return {n: {"exact_match": r["tasks"]["exact_match"], "bpb": r["heldout_text"]["bits_per_byte"]}
            for n, r in per_model.items()}  # fmt: skip
