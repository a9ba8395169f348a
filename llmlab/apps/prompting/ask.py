"""One question, one technique: what ``llmlab prompt MODEL "question"`` runs.

The answer key of a reply is its last number (the eval harness's extraction), else the text after its last
``"answer is"`` (lowercased, trailing punctuation dropped), else the whole stripped reply: self-consistency
votes over these keys, so it works for numeric questions and degrades to exact-text voting otherwise.
"""

from __future__ import annotations

from typing import Any

from llmlab.apps.prompting.builders import TECHNIQUES, build, is_cot
from llmlab.apps.prompting.consistency import majority_vote, parse_number
from llmlab.apps.prompting.evaluate import COT_INSTRUCTION
from llmlab.apps.prompting.exemplars import Embed, Exemplar, ExemplarSelector, gsm8k_pool, suite_pool
from llmlab.apps.prompting.structured import generate_json
from llmlab.errors import ConfigError
from llmlab.infer import LLM, SamplingParams
from llmlab.infer.chat import chat_stop_ids

POOLS = ("gsm8k", "suite")


def answer_key(text: str) -> str | None:
    number = parse_number(text)
    if number is not None:
        return number
    cut = text.lower().rfind("answer is")
    tail = text[cut + len("answer is") :] if cut >= 0 else text
    tail = tail.strip().strip(".!").strip().lower()
    return tail or None


def exemplar_pool(name: str) -> list[Exemplar]:
    if name == "gsm8k":
        return gsm8k_pool(1000)
    if name == "suite":
        return suite_pool(200)
    raise ConfigError(f"--pool {name!r}: one of {', '.join(POOLS)}")


def ask(
    llm: LLM,
    question: str,
    technique: str = "zero",
    k: int = 4,
    n: int = 5,
    selection: str = "random",
    pool: str = "gsm8k",
    embed: Embed | None = None,
    schema: dict[str, Any] | None = None,
    system: str | None = None,
    instruction: str = "",
    temperature: float = 0.7,
    max_tokens: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Answer ``question`` with ``technique``; returns the prompt as rendered, the reply (or replies) and the
    parsed answer (with the vote for self-consistency, the parsed JSON value with ``schema``)."""
    if technique not in TECHNIQUES:
        raise ConfigError(f"--technique {technique!r}: one of {', '.join(TECHNIQUES)}")
    if technique == "self-consistency" and n < 1:
        raise ConfigError(f"--n {n}: self-consistency needs at least one sample")
    exemplars: list[Exemplar] = []
    if technique in ("fewshot", "fewshot-cot") and k:
        candidates = exemplar_pool(pool)
        if technique == "fewshot-cot":
            candidates = [e for e in candidates if e.rationale]
            if not candidates:
                raise ConfigError(f"--pool {pool}: its exemplars have no worked solutions (no fewshot-cot)")
        exemplars = ExemplarSelector(candidates, k, selection, seed, embed, [question]).select(question)
    cot_instruction = instruction or COT_INSTRUCTION
    prompt = build(technique, question, exemplars, instruction, cot_instruction, system)
    limit = max_tokens or (256 if is_cot(technique) else 128)
    result: dict[str, Any] = {"technique": technique, "prompt": prompt.render(llm.tokenizer)}
    if schema is not None:
        reply = generate_json(
            llm, [prompt.engine_prompt(llm)], schema, True, SamplingParams(max_tokens=limit)
        )[0]
        return {**result, "text": reply.text, "json": reply.value, "error": reply.error,
                "finish_reason": reply.finish_reason}  # fmt: skip
    stops = chat_stop_ids(llm.tokenizer)
    samples = n if technique == "self-consistency" else 1
    params = [
        SamplingParams(
            temperature=temperature if samples > 1 else 0.0,
            max_tokens=limit,
            stop_token_ids=stops,
            seed=seed * 1_000_003 + i if samples > 1 else None,
        )  # fmt: skip
        for i in range(samples)
    ]
    outs = llm.generate([prompt.engine_prompt(llm)] * samples, params)
    if samples == 1:
        return {**result, "text": outs[0].text, "answer": answer_key(outs[0].text),
                "finish_reason": outs[0].finish_reason}  # fmt: skip
    vote = majority_vote([answer_key(o.text) for o in outs])
    return {**result, "samples": [o.text for o in outs], "answer": vote.answer, "votes": vote.count,
            "n": vote.n, "margin": round(vote.margin, 3), "counts": vote.counts}  # fmt: skip
