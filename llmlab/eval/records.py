"""Reading the bundled task files and parsing their records back into questions and options.

The commonsense files (LLM-Adapters' repackaging) are instruction records::

    {"instruction": "Please choose the correct answer to the question: Q\\n\\nAnswer1: a Answer2: b\\n\\n
                     Answer format: answer1/answer2", "answer": "answer2", ...}

:func:`parse_choice_record` turns one back into ``{"question", "options", "gold"}``; the number of options
comes from the ``Answer format:`` line, so an option text that happens to contain "Answer3:" cannot add an
option. A record that does not parse is a :class:`MalformedRecord` (file:line and why); the harness counts
those and goes on.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmlab.errors import DataError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EVAL_ASSETS = ASSETS / "eval"


@dataclass
class MalformedRecord(Exception):
    """One record that could not be parsed: ``where`` is ``file:line`` (or ``file:#index`` for a JSON list)."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def asset_path(name: str) -> Path:
    """A bundled file by name (``eval/arc_easy_test.json.gz``); DataError naming it if missing."""
    path = ASSETS / name
    if not path.is_file():
        raise DataError(f"{path}: bundled task file is missing (reinstall llmlab)")
    return path


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


@lru_cache(maxsize=32)
def read_json_records(path: Path) -> tuple[list[tuple[str, Any]], list[MalformedRecord]]:
    """``([(where, record)], malformed)`` from a JSON list or a JSON-lines file (``.gz`` or plain).

    A JSON-lines line that is not JSON is reported as malformed (``file:line``) and skipped.
    """
    good: list[tuple[str, Any]] = []
    bad: list[MalformedRecord] = []
    with _open_text(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        for i, rec in enumerate(items):
            good.append((f"{path.name}:#{i}", rec))
        return good, bad
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            good.append((f"{path.name}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            bad.append(MalformedRecord(f"{path.name}:{lineno}", f"not valid JSON ({exc.msg})"))
    return good, bad


@lru_cache(maxsize=4)
def read_csv_rows(path: Path) -> list[tuple[str, dict[str, str]]]:
    """Rows of a CSV with a header (``.gz`` or plain) as ``[(file:line, row)]``."""
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        return [(f"{path.name}:{reader.line_num}", row) for row in reader]


@lru_cache(maxsize=2)
def read_mmlu(path: Path) -> dict[str, dict[str, list[tuple[str, dict[str, str]]]]]:
    """``{split: {subject: [(where, row)]}}`` from the bundled ``mmlu.tar.xz`` (``mmlu/{dev,test}/*.csv``)."""
    out: dict[str, dict[str, list[tuple[str, dict[str, str]]]]] = {"dev": {}, "test": {}}
    with tarfile.open(path, "r:xz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[1] not in out:
                continue
            split, fname = parts[1], parts[2]
            subject = fname.removesuffix(f"_{split}.csv")
            data = tar.extractfile(member)
            assert data is not None
            reader = csv.DictReader(io.TextIOWrapper(data, encoding="utf-8"))
            out[split][subject] = [(f"{fname}:{reader.line_num}", row) for row in reader]
    return out


# ------------------------------------------------------------------------- instruction-record parsing
_PREFIXES = (
    "Please choose the correct answer to fill in the blank to complete the given sentence: ",
    "Please choose the correct answer to the question: ",
    "Please choose the correct solution to the question: ",
    "Please answer the following question with true or false, question: ",
)
_FORMAT = re.compile(r"\s*Answer format: ((?:[a-z]+\d?/?)+)\s*$")


def parse_choice_record(record: Any, where: str) -> dict[str, Any]:
    """``{"question", "options", "gold"}`` from one commonsense instruction record; MalformedRecord if not.

    ``options`` is empty for BoolQ (true/false), whose gold is then ``"true"``/``"false"``; otherwise
    ``gold`` is the 0-based index of the right option.
    """
    if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
        raise MalformedRecord(where, "expected an object with an 'instruction' string")
    text, answer = record["instruction"], str(record.get("answer", "")).strip().lower()
    prefix = next((p for p in _PREFIXES if text.startswith(p)), None)
    fmt = _FORMAT.search(text)
    if prefix is None or fmt is None:
        raise MalformedRecord(where, "instruction has no known prefix or no 'Answer format:' line")
    labels = fmt.group(1).split("/")
    body = text[len(prefix) : fmt.start()]
    if labels == ["true", "false"]:
        if answer not in labels:
            raise MalformedRecord(where, f"answer {answer!r} is not true/false")
        return {"question": body.strip(), "options": [], "gold": answer}
    word = re.fullmatch(r"([a-z]+)\d", labels[0])
    if word is None or labels != [f"{word.group(1)}{i}" for i in range(1, len(labels) + 1)]:
        raise MalformedRecord(where, f"unexpected answer labels {'/'.join(labels)}")
    marker = word.group(1).capitalize()  # Answer / Solution / Option
    # Split at "Answer1: ", "Answer2: ", ... in order, exactly as many as the format line announces.
    starts = []
    pos = 0
    for i in range(1, len(labels) + 1):
        m = re.compile(rf"(?:^|\s){marker}{i}: ?").search(body, pos)
        if m is None:
            raise MalformedRecord(where, f"option {marker}{i} not found in the instruction")
        starts.append((m.start(), m.end()))
        pos = m.end()
    question = body[: starts[0][0]].strip()
    options = [body[s[1] : (starts[i + 1][0] if i + 1 < len(starts) else len(body))].strip()
               for i, s in enumerate(starts)]  # fmt: skip
    if answer not in labels:
        raise MalformedRecord(where, f"answer {answer!r} is not one of {'/'.join(labels)}")
    if not question or any(not o for o in options):
        raise MalformedRecord(where, "empty question or option")
    return {"question": question, "options": options, "gold": labels.index(answer)}


__all__ = [
    "EVAL_ASSETS",
    "MalformedRecord",
    "asset_path",
    "parse_choice_record",
    "read_csv_rows",
    "read_json_records",
    "read_mmlu",
]
