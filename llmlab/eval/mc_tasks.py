"""Multiple-choice tasks in lm-evaluation-harness's prompt formats (lm-eval 0.4.13's task YAMLs).

Every builder returns :class:`MCDoc` s: one ``(context, continuation)`` request per choice, the choice strings
(whose character lengths ``acc_norm`` divides by, as lm-eval does) and the gold index. Formats:

- ARC-Easy/Challenge, PIQA: ``"Question: {q}\\nAnswer:"`` + ``" {choice}"``;
- BoolQ: ``"{passage}\\nQuestion: {q}?\\nAnswer:"`` + ``" no"``/``" yes"``; the bundled records carry no
  passage (LLM-Adapters dropped it), so the prompt starts at ``"Question:"``;
- OpenBookQA: ``"{question_stem}"`` + ``" {choice}"``; Social IQa: ``"Q: {context} {question}\\nA:"``;
- WinoGrande: partial scoring: the option fills the blank (``sentence[:blank] + option`` is the context)
  and the shared rest of the sentence is the continuation;
- MMLU: ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"`` + the first
  k dev items as ``"{q}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X"`` joined by blank lines, choices
  ``" A".." D"``;
- TruthfulQA MC1/MC2: lm-eval's six-shot QA preamble, ``"\\n\\nQ: {q}\\nA:"``; MC1 choices are the best
  answer then the incorrect ones (gold 0), MC2 the correct answers then the incorrect ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmlab.errors import ConfigError
from llmlab.eval.records import (
    EVAL_ASSETS,
    MalformedRecord,
    parse_choice_record,
    read_csv_rows,
    read_json_records,
    read_mmlu,
)

MMLU_FILE = EVAL_ASSETS / "mmlu.tar.xz"
TRUTHFULQA_FILE = EVAL_ASSETS / "TruthfulQA.csv.gz"
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)
LETTERS = "ABCD"


@dataclass
class MCDoc:
    """One multiple-choice question as log-likelihood requests.

    ``requests[i] = (context, continuation)`` for choice ``i``; ``choices[i]`` is the choice string lm-eval
    measures for ``acc_norm``; ``n_true`` (TruthfulQA MC2) says the first ``n_true`` choices are correct.
    """

    where: str
    requests: list[tuple[str, str]]
    choices: list[str]
    gold: int
    group: str | None = None  # MMLU subject
    n_true: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _commonsense(name: str, fmt: Callable[[dict[str, Any]], MCDoc | None]) -> Callable[..., Any]:
    def build(shots: int = 0) -> tuple[list[MCDoc], list[MalformedRecord]]:
        if shots:
            raise ConfigError(f"task {name}: no exemplar pool for --shots (zero-shot only); use --shots 0")
        recs, bad = read_json_records(EVAL_ASSETS / f"{name}_test.json.gz")
        docs: list[MCDoc] = []
        bad = list(bad)
        for where, rec in recs:
            try:
                parsed = parse_choice_record(rec, where)
                doc = fmt({**parsed, "where": where})
            except MalformedRecord as exc:
                bad.append(exc)
                continue
            except (ValueError, KeyError) as exc:
                bad.append(MalformedRecord(where, str(exc)))
                continue
            if doc is not None:
                docs.append(doc)
        return docs, bad

    return build


def _plain(template: str) -> Callable[[dict[str, Any]], MCDoc]:
    def fmt(p: dict[str, Any]) -> MCDoc:
        ctx = template.format(q=p["question"])
        return MCDoc(p["where"], [(ctx, " " + o) for o in p["options"]], list(p["options"]), p["gold"])

    return fmt


def _boolq(p: dict[str, Any]) -> MCDoc:
    question = p["question"].rstrip("?")
    ctx = f"Question: {question}?\nAnswer:"
    choices = ["no", "yes"]
    return MCDoc(p["where"], [(ctx, " " + c) for c in choices], choices, 1 if p["gold"] == "true" else 0)


def _winogrande(p: dict[str, Any]) -> MCDoc:
    sentence = p["question"]
    if "_" not in sentence:
        raise MalformedRecord(p["where"], "WinoGrande sentence has no '_' blank")
    blank = sentence.index("_")
    target = " " + sentence[blank + 1 :].strip()
    contexts = [sentence[:blank] + o for o in p["options"]]
    return MCDoc(p["where"], [(c, target) for c in contexts], contexts, p["gold"])


def mmlu_prompt(row: dict[str, str]) -> str:
    q = row["question"].strip()
    opts = "".join(f"\n{LETTERS[i]}. {row[f'choice{i}']}" for i in range(4))
    return f"{q}{opts}\nAnswer:"


def _mmlu_row(row: dict[str, str], where: str) -> tuple[dict[str, str], int]:
    if any(row.get(k) is None for k in ("question", "choice0", "choice1", "choice2", "choice3", "answer")):
        raise MalformedRecord(where, "MMLU row lacks a column (question, choice0..3, answer)")
    try:
        gold = int(row["answer"])
    except ValueError as exc:
        raise MalformedRecord(where, f"answer {row['answer']!r} is not an index 0-3") from exc
    if not 0 <= gold < 4:
        raise MalformedRecord(where, f"answer {gold} is not an index 0-3")
    return row, gold


def mmlu_subjects() -> list[str]:
    return sorted(read_mmlu(MMLU_FILE)["test"])


def build_mmlu(
    shots: int = 5, subjects: list[str] | None = None
) -> tuple[list[MCDoc], list[MalformedRecord]]:
    """MMLU test questions with ``shots`` dev exemplars (the first ``shots``, lm-eval's ``first_n``)."""
    data = read_mmlu(MMLU_FILE)
    docs: list[MCDoc] = []
    bad: list[MalformedRecord] = []
    for subject in subjects or sorted(data["test"]):
        pool = data["dev"].get(subject, [])
        if shots > len(pool):
            raise ConfigError(f"--shots {shots}: mmlu {subject} has only {len(pool)} dev exemplars")
        shots_text = []
        for where, row in pool[:shots]:
            row, gold = _mmlu_row(row, where)
            shots_text.append(f"{mmlu_prompt(row)} {LETTERS[gold]}")
        desc = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        prefix = desc + "".join(s + "\n\n" for s in shots_text)
        for where, row in data["test"][subject]:
            try:
                row, gold = _mmlu_row(row, where)
            except MalformedRecord as exc:
                bad.append(exc)
                continue
            ctx = prefix + mmlu_prompt(row)
            docs.append(MCDoc(where, [(ctx, " " + c) for c in LETTERS], list(LETTERS), gold, group=subject))
    return docs, bad


def _split_answers(cell: str) -> list[str]:
    return [a.strip() for a in cell.split(";") if a.strip()]


def build_truthfulqa(mc: int, shots: int = 0) -> tuple[list[MCDoc], list[MalformedRecord]]:
    """TruthfulQA MC1 (``mc=1``) or MC2 (``mc=2``) from the CSV's answer columns."""
    if shots:
        raise ConfigError("truthfulqa: the prompt has a fixed six-shot preamble; --shots is not supported")
    docs: list[MCDoc] = []
    bad: list[MalformedRecord] = []
    for where, row in read_csv_rows(TRUTHFULQA_FILE):
        question, best = (row.get("Question") or "").strip(), (row.get("Best Answer") or "").strip()
        correct = _split_answers(row.get("Correct Answers") or "")
        incorrect = _split_answers(row.get("Incorrect Answers") or "")
        if not question or not best or not correct or not incorrect:
            bad.append(MalformedRecord(where, "TruthfulQA row lacks a question or answers"))
            continue
        ctx = f"{TRUTHFULQA_PREAMBLE}\n\nQ: {question}\nA:"
        choices = [best, *incorrect] if mc == 1 else [*correct, *incorrect]
        docs.append(
            MCDoc(
                where, [(ctx, " " + c) for c in choices], choices, 0, n_true=len(correct) if mc == 2 else None
            )
        )
    return docs, bad


MC_BUILDERS: dict[str, Callable[..., tuple[list[MCDoc], list[MalformedRecord]]]] = {
    "arc_easy": _commonsense("arc_easy", _plain("Question: {q}\nAnswer:")),
    "arc_challenge": _commonsense("arc_challenge", _plain("Question: {q}\nAnswer:")),
    "piqa": _commonsense("piqa", _plain("Question: {q}\nAnswer:")),
    "boolq": _commonsense("boolq", _boolq),
    "winogrande": _commonsense("winogrande", _winogrande),
    "openbookqa": _commonsense("openbookqa", _plain("{q}")),
    "social_iqa": _commonsense("social_iqa", _plain("Q: {q}\nA:")),
    "mmlu": lambda shots=5: build_mmlu(5 if shots is None else shots),
    "truthfulqa_mc1": lambda shots=0: build_truthfulqa(1, shots or 0),
    "truthfulqa_mc2": lambda shots=0: build_truthfulqa(2, shots or 0),
}

# lm-eval's metric list per task (WinoGrande, BoolQ, Social IQa, MMLU and TruthfulQA report acc only).
MC_METRICS: dict[str, tuple[str, ...]] = {
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
    "piqa": ("acc", "acc_norm"),
    "openbookqa": ("acc", "acc_norm"),
    "boolq": ("acc",),
    "winogrande": ("acc",),
    "social_iqa": ("acc",),
    "mmlu": ("acc",),
    "truthfulqa_mc1": ("acc",),
    "truthfulqa_mc2": ("acc",),
}
