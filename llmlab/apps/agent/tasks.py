"""Generated multi-step agent tasks with exact answers, and gold tool-use traces for SFT.

Four families, each needing two or three tool calls:

- ``arithmetic``: chained word problems (calculator, calculator);
- ``units``: a conversion then arithmetic (unit_convert, calculator);
- ``lookup``: facts about invented entities from a RAG index, then a conversion or a difference
  (rag_search, unit_convert | rag_search, rag_search, calculator); no model can know these facts;
- ``data``: a question about a list of numbers answered by a program (python).

Every task carries its answer and the precision it asks for; :func:`is_correct` accepts the last number of
a reply within half a unit of that precision. Training and evaluation tasks come from disjoint seeds and, for
lookups, disjoint entities (:func:`generate_tasks` ``split``), and no evaluation question is a training one.
:func:`gold_trace` runs a task's gold calls through the real tools and returns the chat messages SFT trains on
(the same rendering the agent uses at inference).
"""

from __future__ import annotations

import json
import random
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.apps.agent.loop import AgentConfig, AgentRun, run_agents
from llmlab.apps.agent.policy import Completion, Request, to_template
from llmlab.apps.agent.tools import Tool, format_number
from llmlab.infer.chat import encode_chat

FAMILIES = ("arithmetic", "units", "lookup", "data")
_SYLLABLES = [
    "zor",
    "vath",
    "kel",
    "mir",
    "dun",
    "ober",
    "qua",
    "lin",
    "tesh",
    "ra",
    "vol",
    "ning",
    "bra",
    "sk",
]
_KINDS = [("Tower", "tall"), ("Bridge", "long"), ("Canal", "long"), ("Dam", "high")]
ENTITY_COUNT = 160  # first half for training traces, second half for evaluation


@dataclass
class AgentTask:
    id: str
    family: str
    question: str
    answer: float
    decimals: int = 0
    gold: list[tuple[str, Callable[[list[str]], dict[str, Any]]]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "family": self.family, "question": self.question, "answer": self.answer}


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str
    adjective: str
    meters: int
    year: int

    @property
    def title(self) -> str:
        return f"the {self.name} {self.kind}"

    def document(self) -> str:
        # One short sentence: a 256-token model must hold it in context next to the task.
        return f"The {self.name} {self.kind} is {self.meters} meters {self.adjective} and was completed in {self.year}."


def entities(count: int = ENTITY_COUNT, seed: int = 1234) -> list[Entity]:
    """Invented landmarks (fixed by ``seed``): unique names, lengths and completion years."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < count:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name in seen:
            continue
        seen.add(name)
        kind, adjective = rng.choice(_KINDS)
        out.append(Entity(name, kind, adjective, rng.randint(40, 2400), rng.randint(1801, 2019)))
    return out


def write_corpus(directory: str | Path, count: int = ENTITY_COUNT) -> Path:
    """One markdown file per invented entity under ``directory`` (to index with ``llmlab rag index``)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for e in entities(count):
        (root / f"{e.name.lower()}.md").write_text(e.document() + "\n", encoding="utf-8")
    return root


def _calc(expr: Callable[[list[str]], str]) -> Callable[[list[str]], dict[str, Any]]:
    return lambda obs: {"expression": expr(obs)}


def _arithmetic(rng: random.Random, i: int) -> AgentTask:
    a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(10, 500)
    if rng.random() < 0.5:
        q = f"A warehouse holds {a} crates with {b} bottles each. {c} bottles are shipped out. How many bottles remain?"
        gold = [("calculator", _calc(lambda o: f"{a}*{b}")), ("calculator", _calc(lambda o: f"{o[0]}-{c}"))]
        return AgentTask(f"arith-{i}", "arithmetic", q, a * b - c, 0, gold)
    d = rng.choice([2, 3, 4, 5, 6, 8])
    total = a * b + c
    total -= total % d
    c = total - a * b
    q = (
        f"A club sells {a} tickets at {b} dollars each and receives a gift of {c} dollars. The money is shared "
        f"equally by {d} teams. How many dollars does each team get?"
    )
    gold = [("calculator", _calc(lambda o: f"{a}*{b}+{c}")), ("calculator", _calc(lambda o: f"{o[0]}/{d}"))]
    return AgentTask(f"arith-{i}", "arithmetic", q, total // d, 0, gold)


def _units(rng: random.Random, i: int) -> AgentTask:
    choice = rng.randrange(3)
    if choice == 0:
        x, n = rng.randint(3, 60), rng.randint(2, 9)
        q = f"A relay team runs {n} legs of {x} miles each. How many kilometers do they run in total? Round to 2 decimals."
        km = x * 1.609344
        gold = [
            ("unit_convert", lambda o: {"value": x, "from_unit": "mile", "to_unit": "kilometer"}),
            ("calculator", _calc(lambda o: f"{o[0]}*{n}")),
        ]
        return AgentTask(f"units-{i}", "units", q, round(km * n, 2), 2, gold)
    if choice == 1:
        x, n = rng.randint(2, 40), rng.randint(2, 12)
        q = f"A cake needs {x} ounces of flour. How many grams of flour do {n} cakes need? Round to the nearest whole number."
        gold = [
            ("unit_convert", lambda o: {"value": x, "from_unit": "ounce", "to_unit": "gram"}),
            ("calculator", _calc(lambda o: f"{o[0]}*{n}")),
        ]
        return AgentTask(f"units-{i}", "units", q, round(x * 28.349523125 * n), 0, gold)
    t, d = rng.randint(-20, 110), rng.randint(5, 60)
    q = f"Water at {t} degrees Fahrenheit warms up by {d} degrees Celsius. What is its temperature now in Celsius? Round to 1 decimal."
    gold = [
        ("unit_convert", lambda o: {"value": t, "from_unit": "fahrenheit", "to_unit": "celsius"}),
        ("calculator", _calc(lambda o: f"{o[0]}+{d}")),
    ]
    return AgentTask(f"units-{i}", "units", q, round((t - 32) * 5 / 9 + d, 1), 1, gold)


def _lookup(rng: random.Random, i: int, pool: list[Entity]) -> AgentTask:
    if rng.random() < 0.5:
        e = rng.choice(pool)
        q = f"How many feet {e.adjective} is {e.title}? Round to the nearest whole number."
        gold = [
            ("rag_search", lambda o: {"query": f"{e.name} {e.kind}"}),
            ("unit_convert", lambda o: {"value": e.meters, "from_unit": "meter", "to_unit": "foot"}),
        ]
        return AgentTask(f"lookup-{i}", "lookup", q, round(e.meters / 0.3048), 0, gold)
    e, f = rng.sample(pool, 2)
    q = f"How many years after {f.title} was {e.title} completed? (Negative if before.)"
    gold = [
        ("rag_search", lambda o: {"query": f"{e.name} {e.kind}"}),
        ("rag_search", lambda o: {"query": f"{f.name} {f.kind}"}),
        ("calculator", _calc(lambda o: f"{e.year}-{f.year}")),
    ]
    return AgentTask(f"lookup-{i}", "lookup", q, e.year - f.year, 0, gold)


def _data(rng: random.Random, i: int) -> AgentTask:
    values = [rng.randint(1, 99) for _ in range(rng.choice([7, 9, 11, 13]))]
    kind = rng.randrange(4)
    listing = ", ".join(map(str, values))
    if kind == 0:
        q, ans, expr = (
            "What is the sum of the squares of the values?",
            sum(v * v for v in values),
            "sum(v*v for v in data)",
        )
    elif kind == 1:
        t = rng.randint(20, 80)
        q, ans, expr = (
            f"How many values are greater than {t}?",
            sum(v > t for v in values),
            f"sum(v > {t} for v in data)",
        )
    elif kind == 2:
        q, ans, expr = "What is the median value?", statistics.median(values), "sorted(data)[len(data)//2]"
    else:
        q, ans, expr = (
            "What is the largest value minus the smallest value?",
            max(values) - min(values),
            "max(data)-min(data)",
        )
    question = f"The daily sales were: {listing}. {q}"
    code = f"data = [{listing}]\nprint({expr})"
    return AgentTask(f"data-{i}", "data", question, ans, 0, [("python", lambda o: {"code": code})])


def generate_tasks(n: int = 240, split: str = "eval", seed: int | None = None) -> list[AgentTask]:
    """``n`` tasks, the families in turn. ``split`` "train" and "eval" use disjoint seeds and entities."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    rng = random.Random(seed if seed is not None else (1 if split == "train" else 2))
    pool = entities()
    pool = pool[: len(pool) // 2] if split == "train" else pool[len(pool) // 2 :]
    makers = [_arithmetic, _units, lambda r, i: _lookup(r, i, pool), _data]
    tasks, seen = [], set()
    banned = {t.question for t in generate_tasks(n, "train")} if split == "eval" else set()
    while len(tasks) < n:
        task = makers[len(tasks) % len(makers)](rng, len(tasks))
        if task.question in seen or task.question in banned:
            continue
        seen.add(task.question)
        tasks.append(task)
    return tasks


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def is_correct(reply: str, task: AgentTask) -> bool:
    """The reply's last number equals the answer at the task's precision (half a unit of it)."""
    numbers = _NUMBER.findall(reply.replace("−", "-"))
    if not numbers:
        return False
    try:
        value = float(numbers[-1].replace(",", ""))
    except ValueError:
        return False
    return abs(value - task.answer) <= 0.5 * 10 ** (-task.decimals) + 1e-9


def gold_trace(task: AgentTask, tools: list[Tool], system_prompt: str) -> list[dict[str, Any]]:
    """The task solved by its gold calls through the real ``tools``: OpenAI chat messages ending with the
    answer (the assistant's last turn)."""
    by_name = {t.name: t for t in tools}
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": task.question},
    ]
    observations: list[str] = []
    for k, (name, make_args) in enumerate(task.gold):
        args = make_args(observations)
        call = {
            "id": f"call_{k}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        observation = by_name[name](args)
        observations.append(observation)
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{k}", "content": observation})
    messages.append({"role": "assistant", "content": format_number(task.answer)})
    return messages


def call_text(name: str, args: dict[str, Any]) -> str:
    """An assistant's tool call as the chat template renders it (:func:`llmlab.serve.tools.template_messages`)."""
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {json.dumps(args)}}}\n</tool_call>'


class GoldPolicy:
    """A policy that plays each task's gold calls, then its answer, and records every turn as an SFT example.

    Run through the real loop (:func:`llmlab.apps.agent.loop.run_agents`) with the student's tokenizer and
    context, so each recorded prompt is exactly what the student will see at inference, folded history included.
    It runs each gold call itself too (the tools are deterministic) to know the values later calls need.
    """

    def __init__(self, tasks: list[AgentTask], tools: list[Tool], tokenizer: Any, max_context: int | None):
        self.by_question = {t.question: t for t in tasks}
        self.tools = {t.name: t for t in tools}
        self.tokenizer, self.max_context = tokenizer, max_context
        self.records: list[dict[str, Any]] = []
        self._observations: dict[str, list[str]] = {}

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
        return len(encode_chat(self.tokenizer, to_template(messages, tools))[1])

    def complete(self, requests: list[Request]) -> list[Completion]:
        out = []
        for req in requests:
            task = next(t for q, t in self.by_question.items() if req.messages[1]["content"].startswith(q))
            seen = self._observations.setdefault(task.id, [])
            calls = []
            if len(seen) < len(task.gold):
                name, make_args = task.gold[len(seen)]
                args = make_args(seen)
                text = call_text(name, args)
                call = {
                    "id": f"call_{len(seen)}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args)},
                }
                calls.append(call)
                seen.append(self.tools[name](args))
            else:
                text = format_number(task.answer)
            shown = req.tools if req.show_tools else None
            prompt = to_template(req.messages, shown)
            self.records.append({"messages": [*prompt, {"role": "assistant", "content": text}]})
            out.append(Completion("" if calls else text, calls))
        return out


def sft_records(
    tasks: list[AgentTask], tools: list[Tool], tokenizer: Any, max_context: int | None, config: AgentConfig
) -> list[dict[str, Any]]:
    """``{"messages": [...]}`` records for ``llmlab sft``: one per turn of each task's gold run through the
    real loop under ``config``, rendered exactly as the student sees it at inference."""
    policy = GoldPolicy(tasks, tools, tokenizer, max_context)
    run_agents([AgentRun(t.question, tools, policy, config) for t in tasks], policy)
    return policy.records
