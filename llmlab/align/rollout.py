"""What PPO and GRPO share: verifiable problems and their rewards, rollouts through the inference engine,
and turning (prompt, completion) token lists into training batches.

Problems come from the task suite (``tasks``, ``tasks:addition,sort``) or the shipped math word problems
(``svamp``, ``multiarith``, ``addsub``, ``singleeq``; GSM8K train as ``gsm8k``). Each has a train and a
held-out split fixed by a hash of the question text, so evaluation never sees a training prompt.

The verifier's reward is exact match on the parsed final answer plus a small format reward: the task suite's
own scorer for its tasks; for math, the number after "The answer is", compared numerically.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.align.data import ASSETS, Encoded, load_pairs, pad_sequences, record_to_pair
from llmlab.data import tasks as suite
from llmlab.errors import ConfigError, DataError
from llmlab.infer import LLM
from llmlab.infer.sampling import SamplingParams
from llmlab.losses.tokens import token_logps
from llmlab.sft.chat import prompt_ids
from llmlab.train.distributed import model_device

MATH_FILES = {
    name: ASSETS / f"{name}_test.jsonl.gz" for name in ("svamp", "multiarith", "addsub", "singleeq")
}
GSM8K_TRAIN = ASSETS.parent / "sft" / "gsm8k_train.jsonl.gz"
MATH_SUFFIX = "\nSolve it step by step, then end with: The answer is N."
_ANSWER = re.compile(r"[Tt]he answer is\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
HELDOUT_PERCENT = 20


@dataclass
class Problem:
    prompt: list[dict[str, str]]
    answer: str
    task: str
    record: dict[str, Any] = field(default_factory=dict)


def _heldout(text: str) -> bool:
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h % 100 < HELDOUT_PERCENT


def _read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: missing (shipped data not installed?)")
    return [
        json.loads(line) for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines() if line
    ]


def load_problems(source: str, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
    """Problems of one source and split (``train`` or ``test``), ``n`` at most (sampled deterministically)."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    name, _, sub = source.partition(":")
    if name == "tasks":
        names = [t for t in sub.split(",") if t] or None
        if split == "train":
            recs = suite.make_sft_examples(n or 2000, seed=seed, tasks=names)
        else:
            per = max(1, (n or 200) // len(names or suite.TASKS))
            recs = suite.make_test_set(per, seed=1234 + seed, tasks=names)
        return [Problem([{"role": "user", "content": r["prompt"]}], r["answer"], r["task"], r) for r in recs]
    if name in MATH_FILES or name == "gsm8k":
        rows = _read_jsonl_gz(MATH_FILES.get(name, GSM8K_TRAIN))
        out = []
        for r in rows:
            q = r["question"].strip()
            ans = r["answer"].split("####")[-1].strip() if name == "gsm8k" else r["answer"]
            if _heldout(q) == (split == "test"):
                out.append(Problem([{"role": "user", "content": q + MATH_SUFFIX}], ans, name, r))
        if n is not None and n < len(out):
            out = random.Random(seed).sample(out, n)
        return out
    raise ConfigError(f"unknown problem source {source!r} (tasks[:a,b], {', '.join(MATH_FILES)}, gsm8k)")


def _num(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def score_completion(problem: Problem, completion: str) -> tuple[bool, bool]:
    """``(correct, format_ok)`` of a completion, by the problem's verifier."""
    if problem.record.get("task") and problem.task == problem.record["task"]:
        s = suite.score(problem.task, problem.record, completion)
        return bool(s["correct"]), bool(s["format_ok"])
    m = _ANSWER.search(completion)
    if m is not None:
        got = _num(m.group(1))
    else:
        nums = _NUMBER.findall(completion)
        got = _num(nums[-1]) if nums else None
    want = _num(problem.answer)
    correct = got is not None and want is not None and abs(got - want) < 1e-4
    return correct, m is not None


def verifier_reward(
    problem: Problem, completion: str, format_weight: float = 0.1
) -> tuple[float, bool, bool]:
    """Exact match (1/0) plus ``format_weight`` for the asked answer format."""
    correct, fmt = score_completion(problem, completion)
    return float(correct) + format_weight * float(fmt), correct, fmt


# ----------------------------------------------------------------------------------------- rollouts
def prompt_token_ids(tokenizer: Any, problem: Problem) -> list[int]:

    return prompt_ids(tokenizer, problem.prompt)


def make_engine(model: nn.Module, tokenizer: Any, max_batch_size: int = 64):
    """A generation engine over the policy's current weights.

    Make a fresh one for every rollout: an engine kept across optimizer steps was measured to return
    log-probs of the *old* weights (0.03 nats off after 3 AdamW steps), which silently turns on-policy RL
    off-policy. Building one is cheap next to a rollout.
    """

    return LLM.from_model(model, tokenizer, max_batch_size=max_batch_size)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> list[Any]:
    """Sample one completion per prompt from the live policy (token-id prompts; per-request seeds make a run
    reproducible), through a fresh engine (see :func:`make_engine`)."""

    params = [
        SamplingParams(
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed * 100_003 + i,
            logprobs=True,
        )
        for i in range(len(prompts))
    ]
    was = model.training
    # A decode step costs about the same at batch 64 or 256 on a GPU (Python and launch overhead dominate), so
    # rollouts run 4x wider there; on a CPU the step time grows with the batch.
    cap = 256 if model_device(model).type == "cuda" else 64
    engine = make_engine(model, tokenizer, max_batch_size=min(cap, max(1, len(prompts))))
    try:
        return engine.generate([list(p) for p in prompts], params)
    finally:
        model.train(was)


def rl_batch(
    prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int
) -> dict[str, Tensor]:
    """Right-padded next-token batch whose labels are the completion tokens (see :func:`pad_sequences`)."""
    seqs = []
    for p, c in zip(prompts, completions, strict=True):
        if not c:
            c = [pad_id]  # an empty completion still needs one target; its advantage/reward handles it
        seqs.append(Encoded(list(p), list(c)))
    return pad_sequences(seqs, pad_id)


@torch.no_grad()
def batch_token_logps(model: nn.Module, batch: dict[str, Tensor], chunk: int = 16) -> Tensor:
    """Per-token log-probs ``[N, T]`` of the labels (0 off the completion), in no-grad chunks, on the
    model's device."""
    device = model_device(model)
    out = []
    for s in range(0, batch["input_ids"].shape[0], chunk):
        ids, mask, labels = (
            batch[k][s : s + chunk].to(device) for k in ("input_ids", "attention_mask", "labels")
        )
        out.append(token_logps(model(ids, attention_mask=mask), labels))
    return torch.cat(out)


def split_batch(batch: dict[str, Tensor], size: int) -> list[dict[str, Tensor]]:
    """Micro-batches of ``size`` rows (every tensor sliced along dim 0), trimmed to their longest row."""
    n = batch["input_ids"].shape[0]
    out = []
    for s in range(0, n, size):
        mb = {k: v[s : s + size] for k, v in batch.items()}
        width = int(mb["attention_mask"].sum(1).max())
        mb = {
            k: (v[:, :width] if v.dim() == 2 and v.shape[1] == batch["input_ids"].shape[1] else v)
            for k, v in mb.items()
        }
        out.append(mb)
    return out


@torch.no_grad()
def evaluate_problems(
    model: nn.Module, tokenizer: Any, problems: Sequence[Problem], max_tokens: int, scorer: Any = None
) -> dict[str, float]:
    """Greedy exact match and format rate on held-out problems (overall and per task); with ``scorer``
    (``(problems, prompts, outs) -> scores``, e.g. PPO's reward model) also its mean score of the same
    greedy answers, ``reward_score``."""
    prompts = [prompt_token_ids(tokenizer, p) for p in problems]
    outs = generate(model, tokenizer, prompts, max_tokens, 0.0, 1.0, seed=0)
    per: dict[str, list[tuple[bool, bool]]] = {}
    for p, o in zip(problems, outs):
        per.setdefault(p.task, []).append(score_completion(p, o.text))
    scores = [s for v in per.values() for s in v]
    res = {
        "exact_match": sum(c for c, _ in scores) / max(len(scores), 1),
        "format_ok": sum(f for _, f in scores) / max(len(scores), 1),
    }
    for task, v in per.items():
        res[f"exact_match/{task}"] = sum(c for c, _ in v) / len(v)
    if scorer is not None:
        res["reward_score"] = float(scorer(list(problems), prompts, outs).float().mean())
    return res


@torch.no_grad()
def sampled_reward_score(
    model: nn.Module,
    tokenizer: Any,
    problems: Sequence[Problem],
    scorer: Any,
    samples: int,
    max_tokens: int,
    temperature: float,
    seed: int = 0,
) -> float:
    """Mean score of ``samples`` sampled completions per problem: what PPO maximizes, on prompts it never
    trained on (greedy answers, :func:`evaluate_problems`, are a different distribution from the rollouts)."""
    reps = [p for p in problems for _ in range(samples)]
    prompts = [prompt_token_ids(tokenizer, p) for p in reps]
    outs = generate(model, tokenizer, prompts, max_tokens, temperature, 1.0, seed)
    return float(scorer(reps, prompts, outs).float().mean())


@dataclass
class OnPolicyConfig:
    """How ``onpolicy:SOURCE`` preference data is sampled from the starting policy."""

    prompts: int = 2000  # training-split problems to sample (``max_pairs`` caps it when set)
    samples: int = 4  # completions per problem
    temperature: float = 1.0
    max_tokens: int = 24
    # When no sample is right: True pairs the reference answer (off-policy) against a wrong sample; False drops
    # the problem, so both sides of every pair are the policy's own samples.
    reference_chosen: bool = True


@torch.no_grad()
def verifier_pairs(
    model: nn.Module,
    tokenizer: Any,
    source: str,
    n_prompts: int,
    samples: int = 4,
    temperature: float = 1.0,
    max_tokens: int = 24,
    seed: int = 0,
    reference_chosen: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """On-policy preference pairs judged by the verifier: ``({"prompt", "chosen", "rejected"}, stats)``.

    For each training-split problem the policy samples ``samples`` completions. The chosen response is a
    sample the verifier accepts (right answer, asked format), or the reference answer when none is (unless
    ``reference_chosen`` is False: then such problems are dropped); the rejected one is the most frequent
    sample the verifier rejects. Problems the policy always solves carry no preference and are dropped. Pairs built from the policy's *own* mistakes put the DPO gradient where the
    policy actually puts probability, which synthetic wrong answers (:func:`llmlab.data.tasks
    .make_preference_pairs`) mostly do not (the RSO / iterative-RPO recipe).
    """
    problems = load_problems(source, "train", n_prompts, seed=seed)
    prompts = [prompt_token_ids(tokenizer, p) for p in problems]
    rep_prompts = [p for p in prompts for _ in range(samples)]
    outs = generate(model, tokenizer, rep_prompts, max_tokens, temperature, 1.0, seed)
    pairs: list[dict[str, Any]] = []
    n_correct = 0
    for i, problem in enumerate(problems):
        texts = [o.text.strip() for o in outs[i * samples : (i + 1) * samples]]
        good, bad = [], []
        for t in texts:
            correct, fmt = score_completion(problem, t)
            (good if correct and fmt else bad).append(t)
        n_correct += len(good)
        bad = [t for t in bad if t]  # an empty completion is no response to prefer against
        if not bad or (not good and not reference_chosen):
            continue
        chosen = good[0] if good else problem.answer
        rejected = max(set(bad), key=bad.count)
        if chosen == rejected:
            continue
        pairs.append({"prompt": problem.prompt, "chosen": chosen, "rejected": rejected})
    stats = {
        "onpolicy_prompts": len(problems),
        "onpolicy_sample_accuracy": n_correct / max(len(outs), 1),
        "onpolicy_pairs": len(pairs),
    }
    return pairs, stats


def gather_pairs(
    sources: Sequence[str],
    model: nn.Module | None,
    tokenizer: Any,
    stats: Any,
    skip_invalid: bool = False,
    limit: int | None = None,
    onpolicy: OnPolicyConfig | None = None,
    seed: int = 0,
) -> list[Any]:
    """Preference pairs of every source: a file or named source (:func:`llmlab.align.data.load_pairs`), or
    ``onpolicy:SOURCE`` sampled from ``model`` and judged by the verifier (:func:`verifier_pairs`)."""

    onpolicy = onpolicy or OnPolicyConfig()
    out = []
    for src in sources:
        if not src.startswith("onpolicy:"):
            out += load_pairs(src, skip_invalid, stats, limit)
            continue
        if model is None:
            raise ConfigError(f"data source {src!r} samples the policy, so it needs the model")
        records, info = verifier_pairs(
            model,
            tokenizer,
            src.partition(":")[2],
            limit or onpolicy.prompts,
            onpolicy.samples,
            onpolicy.temperature,
            onpolicy.max_tokens,
            seed=seed,
            reference_chosen=onpolicy.reference_chosen,
        )
        stats.extra.update(info)
        if not records:
            raise ConfigError(
                f"data source {src!r}: the policy solved every sampled prompt; no pairs to learn from"
            )
        out += [record_to_pair(r, f"{src}:{i}") for i, r in enumerate(records)]
    return out
