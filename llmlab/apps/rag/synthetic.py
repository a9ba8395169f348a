"""A synthetic corpus about invented entities, for closed-book vs open-book evaluation.

Every name is built from random syllables (``random.Random(seed)``), so no model can know any fact here: without
retrieval, exact match is ~0, and what the model gains with retrieval is what retrieval adds. Each document
describes one town or one person; every fact gets one question with a short exact answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "tr",
    "qu",
    "th",
]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "nd", "sk"]
_PRODUCTS = ["copper bells", "blue cheese", "glass beads", "wool carpets", "clay pipes", "rope ladders",
             "silver spoons", "paper lanterns", "oak barrels", "salt fish"]  # fmt: skip
_JOBS = ["engineer", "merchant", "surveyor", "priest", "sailor", "weaver", "astronomer", "miller"]
_FIELDS = ["chemistry", "botany", "geology", "music", "mathematics", "medicine", "architecture", "law"]
_DEVICES = ["a tide clock", "a seed drill", "a water lens", "a folding loom", "a steam kettle", "a wind gauge",
            "a copper telescope", "a rope pump"]  # fmt: skip


@dataclass(frozen=True)
class SyntheticQA:
    id: str
    question: str
    answer: str
    source: str  # the document's file name


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def _unique(rng: random.Random, used: set[str], syllables: int) -> str:
    while True:
        w = _word(rng, syllables)
        if w not in used and len(w) > 3:
            used.add(w)
            return w


def make_corpus(
    n_towns: int = 20, n_people: int = 20, seed: int = 19
) -> tuple[dict[str, str], list[SyntheticQA]]:
    """``(files, questions)``: file name -> document text, and the questions with their exact answers."""
    rng = random.Random(seed)
    used: set[str] = set()
    files: dict[str, str] = {}
    qas: list[SyntheticQA] = []

    def add(source: str, question: str, answer: str) -> None:
        qas.append(SyntheticQA(f"syn-{len(qas):03d}", question, answer, source))

    for i in range(n_towns):
        town, province = _unique(rng, used, 2), _unique(rng, used, 3)
        founder = f"{_unique(rng, used, 2)} {_unique(rng, used, 2)}"
        year, population = rng.randint(1100, 1899), rng.randint(2, 90) * 100
        product, job = rng.choice(_PRODUCTS), rng.choice(_JOBS)
        name = f"town_{i:02d}_{town.lower()}.txt"
        files[name] = (
            f"{town}\n\n{town} is a small town in the province of {province}. It was founded in {year} by "
            f"{founder}, a {job} who settled by the river. Today {town} is best known for its {product}, which "
            f"are sold in markets across {province}. The town has a population of about {population} people.\n"
        )
        add(name, f"In what year was the town of {town} founded?", str(year))
        add(name, f"Who founded the town of {town}?", founder)
        add(name, f"In which province is the town of {town}?", province)
        add(name, f"What is the town of {town} best known for?", product)
    for i in range(n_people):
        first, last = _unique(rng, used, 2), _unique(rng, used, 2)
        city, uni = _unique(rng, used, 2), _unique(rng, used, 3)
        born, field, device = rng.randint(1700, 1950), rng.choice(_FIELDS), rng.choice(_DEVICES)
        name = f"person_{i:02d}_{last.lower()}.txt"
        files[name] = (
            f"{first} {last}\n\n{first} {last} was born in the city of {city} in {born}. {last} studied {field} "
            f"at the University of {uni}, and is remembered for inventing {device}. Colleagues described "
            f"{last} as patient and exact.\n"
        )
        add(name, f"In what year was {first} {last} born?", str(born))
        add(name, f"In which city was {first} {last} born?", city)
        add(name, f"What did {first} {last} study?", field)
        add(name, f"At which university did {first} {last} study?", f"University of {uni}")
        add(name, f"What did {first} {last} invent?", device)
    return files, qas


def write_corpus(out: Path, files: dict[str, str]) -> Path:
    """Write the documents under ``out`` (same bytes every time) and return ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = out / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    return out
