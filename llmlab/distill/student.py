"""Draft students for speculative decoding: a shallow copy of the teacher (its embedding, head, final norm and
a few of its blocks), and the check that it works as a draft (acceptance rate, identical greedy output)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from llmlab.errors import ConfigError
from llmlab.infer import LLM, SamplingParams
from llmlab.model.transformer import Transformer


def spaced_layers(n_teacher: int, depth: int) -> list[int]:
    """``depth`` evenly spaced block indices of an ``n_teacher``-block model, first and last included."""
    if depth >= n_teacher:
        return list(range(n_teacher))
    if depth == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (depth - 1)) for i in range(depth)]


def student_from_teacher(teacher: Transformer, layers: Sequence[int]) -> Transformer:
    """A teacher-shaped Transformer with ``len(layers)`` blocks, copied from the teacher's ``layers``.

    Embedding, tied/untied head and final norm are copied too, so student and teacher share a vocabulary and
    an output space (what speculative decoding and the KD loss both need).
    """
    n = teacher.cfg.n_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ConfigError(f"student_layers: teacher layer {bad[0]} does not exist (the teacher has {n})")
    student = Transformer(dataclasses.replace(teacher.cfg, n_layers=len(layers)))
    source = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        src = name
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            src = f"layers.{layers[int(i)]}.{rest}"
        state[name] = source[src].detach().float().clone()
    student.load_state_dict(state, strict=True)
    return student


def speculative_check(
    teacher: nn.Module,
    draft: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    k: int,
    max_tokens: int,
) -> dict[str, Any]:
    """Greedy decoding of ``prompts`` by the teacher alone and with ``draft`` proposing ``k`` tokens a step.

    Returns the acceptance rate (accepted / proposed drafts), mean tokens per target forward, wall times
    (one request at a time) and whether the outputs are identical (they must be: greedy verification keeps
    exactly the target's argmax).
    """
    params = SamplingParams(max_tokens=max_tokens)
    plain = LLM.from_model(teacher, tokenizer, max_batch_size=1, kv_cache_mb=64)
    spec = LLM.from_model(
        teacher,
        tokenizer,
        max_batch_size=1,
        kv_cache_mb=64,
        speculative={"method": "draft", "draft_model": draft, "num_tokens": k},
    )
    t0 = time.perf_counter()
    want = [plain.generate([p], params)[0].token_ids for p in prompts]
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = [spec.generate([p], params)[0].token_ids for p in prompts]
    t_spec = time.perf_counter() - t0
    st = spec.speculative.stats
    return {
        "k": k,
        "prompts": len(prompts),
        "acceptance": st["accepted"] / max(1, st["proposed"]),
        "tokens_per_step": st["emitted"] / max(1, st["steps"]),
        "identical": got == want,
        "tokens": sum(len(t) for t in want),
        "seconds_target_alone": t_plain,
        "seconds_speculative": t_spec,
    }
