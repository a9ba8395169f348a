"""Constitutional AI's supervised phase (Bai et al. 2022): sample, critique against a principle, revise.

Per prompt (a conversation ending in a user turn), with one policy model through ``llmlab.LLM``:

1. the policy samples a reply;
2. the same model is asked a principle's critique request about that reply (the conversation continues:
   ``... user: prompt, assistant: reply, user: critique request``);
3. then the principle's revision request (``... assistant: critique, user: revision request``): the answer is
   the revised reply.

Outputs: the preference pair ``{"prompt", "chosen": revised, "rejected": original}`` (the revision is
preferred: what ``llmlab rm --data`` / ``llmlab align --data`` read) and the SFT record
``{"messages": prompt + [assistant: revised]}`` (what ``llmlab sft --data`` reads). Revisions that come back
empty or identical to the original carry no preference and are dropped (counted). The principles live in a
shipped constitution file (:data:`CONSTITUTION`); each prompt draws one with a seeded RNG.

Every step is one batched ``LLM.generate`` call over all prompts; :func:`critique_revise` reports the tokens
generated per kept pair (the cost of the method).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmlab.errors import ConfigError
from llmlab.infer import LLM, SamplingParams
from llmlab.infer.chat import chat_stop_ids

CONSTITUTION = Path(__file__).resolve().parent.parent / "assets" / "cai" / "constitution.json"


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str


def load_constitution(path: str | Path = CONSTITUTION) -> list[Principle]:
    """The principles of a constitution file (ConfigError naming the file and the bad entry)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the constitution ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from exc
    items = data.get("principles") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: needs a non-empty 'principles' list")
    principles = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip()
                                                 for k in ("name", "critique", "revision")):  # fmt: skip
            raise ConfigError(f"{path}: principles[{i}] needs non-empty 'name', 'critique' and 'revision'")
        principles.append(Principle(item["name"], item["critique"], item["revision"]))
    return principles


def _texts(llm: LLM, convs: list[list[dict[str, str]]], params: SamplingParams) -> tuple[list[str], int]:
    outs = llm.generate(convs, params)
    return [o.text.strip() for o in outs], sum(len(o.token_ids) for o in outs)


def critique_revise(
    llm: LLM,
    prompts: Sequence[list[dict[str, str]]],
    principles: Sequence[Principle] | None = None,
    max_tokens: int = 96,
    temperature: float = 0.7,
    seed: int = 0,
) -> dict[str, Any]:
    """Sample, critique and revise each prompt's reply; returns ``{"pairs", "sft", "records", "stats"}``."""
    principles = list(principles or load_constitution())
    rng = random.Random(seed)
    chosen_principles = [rng.choice(principles) for _ in prompts]
    stops = chat_stop_ids(llm.tokenizer)
    sample = [SamplingParams(temperature=temperature, max_tokens=max_tokens, stop_token_ids=stops,
                             seed=seed * 1_000_003 + i) for i in range(len(prompts))]  # fmt: skip
    greedy = SamplingParams(max_tokens=max_tokens, stop_token_ids=stops)
    originals, n1 = _texts(llm, [list(p) for p in prompts], sample)
    critique_convs = [
        [*p, {"role": "assistant", "content": r}, {"role": "user", "content": pr.critique}]
        for p, r, pr in zip(prompts, originals, chosen_principles, strict=True)
    ]
    critiques, n2 = _texts(llm, critique_convs, greedy)
    revision_convs = [
        [*c, {"role": "assistant", "content": cr}, {"role": "user", "content": pr.revision}]
        for c, cr, pr in zip(critique_convs, critiques, chosen_principles, strict=True)
    ]
    revisions, n3 = _texts(llm, revision_convs, greedy)
    pairs, sft, records, dropped = [], [], [], 0
    for p, orig, crit, rev, pr in zip(
        prompts, originals, critiques, revisions, chosen_principles, strict=True
    ):
        records.append(
            {"prompt": p, "principle": pr.name, "original": orig, "critique": crit, "revision": rev}
        )
        if not rev or not orig or rev == orig:
            dropped += 1
            continue
        pairs.append({"prompt": list(p), "chosen": rev, "rejected": orig})
        sft.append({"messages": [*p, {"role": "assistant", "content": rev}]})
    generated = n1 + n2 + n3
    stats = {"prompts": len(prompts), "pairs": len(pairs), "dropped": dropped, "tokens_generated": generated,
             "tokens_per_pair": round(generated / len(pairs), 1) if pairs else None}  # fmt: skip
    return {"pairs": pairs, "sft": sft, "records": records, "stats": stats}


def read_jsonl(path: str | Path, label: str = "") -> list[tuple[int, Any]]:
    """``(line number, record)`` for each non-blank line of a JSONL file; ConfigError for an unreadable file
    (prefixed by ``label``, e.g. the option that named it) or a line that is not JSON (naming file:line)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{label}{path}: cannot read it ({exc.strerror})") from exc
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((i, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{i}: not JSON ({exc.msg})") from exc
    return records


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
