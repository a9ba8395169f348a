"""The verifiable tasks: each generates a question, its one correct answer, and plausible wrong answers.

Every task answers in a strict, short format stated in the prompt, so a scorer can check both the format
(``format_ok``) and the parsed value (``correct``). Letters are spelled with spaces (``h e l l o``) so the
character-level tasks stay character-level under any BPE tokenizer.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

_INT = re.compile(r"-?\d+")
WORDS = (
    "apple river stone cloud tiger paper green house music light water bread chair dream forest "
    "garden horse island lemon mountain night ocean pencil queen rabbit silver table violin window yellow "
    "zebra candle dragon engine flower guitar honey jacket kitten ladder mirror"
).split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"
NAMES = "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Liam Maria Noah Olivia Peter".split()
CITIES = "Paris London Tokyo Madrid Berlin Rome Cairo Lima Oslo Dublin Vienna Prague Sydney Toronto".split()
JOBS = "baker doctor teacher farmer pilot nurse writer painter chef lawyer".split()
UNITS = {  # (from, to): factor
    ("km", "m"): 1000,
    ("m", "cm"): 100,
    ("cm", "mm"): 10,
    ("kg", "g"): 1000,
    ("L", "mL"): 1000,
    ("hours", "minutes"): 60,
    ("minutes", "seconds"): 60,
    ("feet", "inches"): 12,
}


@dataclass
class Task:
    """Base class. Subclasses implement ``question``, ``wrong_answer`` and (optionally) ``parse``."""

    name: str = ""
    instruction: str = "Answer with the number only."
    format_re: str = r"-?\d+"

    def question(self, rng: random.Random) -> tuple[str, str]:
        """(question text, canonical answer)."""
        raise NotImplementedError

    def sample(self, rng: random.Random) -> dict[str, Any]:
        q, a = self.question(rng)
        return {"task": self.name, "prompt": f"{q} {self.instruction}", "answer": a}

    def wrong_answer(self, record: dict[str, Any], rng: random.Random) -> str:
        """A plausible, well-formatted but wrong answer (e.g. off by one, a swapped pair)."""
        raise NotImplementedError

    def badly_formatted(self, record: dict[str, Any], rng: random.Random) -> str:
        """The right value in the wrong format (chatty prose around it)."""
        return f"Sure! The answer is {record['answer']}. Let me know if you need anything else."

    def parse(self, completion: str) -> Any:
        """The answer a completion gives (lenient: the first match anywhere), or None."""
        m = _INT.search(completion)
        return int(m.group()) if m else None

    def expected(self, record: dict[str, Any]) -> Any:
        return self.parse(record["answer"])

    def format_ok(self, completion: str) -> bool:
        return re.fullmatch(self.format_re, completion.strip()) is not None

    def score(self, record: dict[str, Any], completion: str) -> dict[str, bool]:
        got = self.parse(completion)
        return {
            "correct": got is not None and got == self.expected(record),
            "format_ok": self.format_ok(completion),
        }


def _off_by(value: int, rng: random.Random) -> int:
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    return value + delta if value + delta != value else value + 1


class Addition(Task):
    def __init__(self, max_digits: int = 2):
        super().__init__(name="addition")
        self.max_digits = max_digits

    def question(self, rng):
        a = rng.randint(0, 10**self.max_digits - 1)
        b = rng.randint(0, 10**self.max_digits - 1)
        return f"What is {a} + {b}?", str(a + b)

    def wrong_answer(self, record, rng):
        return str(_off_by(self.expected(record), rng))


class Multiplication(Task):
    def __init__(self, max_digits_a: int = 2, max_digits_b: int = 1):
        super().__init__(name="multiplication")
        self.da, self.db = max_digits_a, max_digits_b

    def question(self, rng):
        a = rng.randint(2, 10**self.da - 1)
        b = rng.randint(2, 10**self.db - 1)
        return f"What is {a} * {b}?", str(a * b)

    def wrong_answer(self, record, rng):
        return str(_off_by(self.expected(record), rng))


class _ListTask(Task):
    """Tasks whose answer is a sequence of items (``item_re``) joined by ``sep``."""

    sep = " "
    item_re = r"[a-z]"

    def _list_re(self) -> str:
        return f"{self.item_re}(?:{re.escape(self.sep)}{self.item_re})*"

    def parse(self, completion):
        # Lenient: the longest run of separated items anywhere in the completion.
        runs = [
            m.group() for m in re.finditer(rf"(?<![A-Za-z0-9]){self._list_re()}(?![A-Za-z0-9])", completion)
        ]
        if not runs:
            return None
        return max(runs, key=len).split(self.sep)

    def format_ok(self, completion):
        return re.fullmatch(self._list_re(), completion.strip()) is not None


def _letters(rng: random.Random, min_len: int, max_len: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))


class Reverse(_ListTask):
    def __init__(self, min_len: int = 3, max_len: int = 7):
        super().__init__(name="reverse", instruction="Answer with the reversed letters, separated by spaces.")
        self.min_len, self.max_len = min_len, max_len

    def question(self, rng):
        # Random letters, not dictionary words: a prompt space of ~26^7, so the held-out split can only be
        # solved by reversing, not by recalling a word seen in training.
        word = _letters(rng, self.min_len, self.max_len)
        return f"Reverse the letters: {' '.join(word)}.", " ".join(reversed(word))

    def wrong_answer(self, record, rng):
        letters = record["answer"].split()
        if len(set(letters)) == 1:
            return " ".join(letters + letters[:1])
        wrong = list(letters)
        while wrong == letters:
            i, j = rng.sample(range(len(letters)), 2)
            wrong[i], wrong[j] = wrong[j], wrong[i]
        return " ".join(wrong)


class SortNumbers(_ListTask):
    sep = ", "
    item_re = r"\d+"

    def __init__(self, min_items: int = 3, max_items: int = 5, max_value: int = 99):
        super().__init__(name="sort", instruction="Answer with the sorted numbers, separated by commas.")
        self.min_items, self.max_items, self.max_value = min_items, max_items, max_value

    def question(self, rng):
        nums = [rng.randint(0, self.max_value) for _ in range(rng.randint(self.min_items, self.max_items))]
        return f"Sort from smallest to largest: {', '.join(map(str, nums))}.", ", ".join(
            map(str, sorted(nums))
        )

    def wrong_answer(self, record, rng):
        nums = record["answer"].split(", ")
        if len(set(nums)) == 1:
            return ", ".join(nums[:-1])
        wrong = list(nums)
        while wrong == nums:
            i, j = rng.sample(range(len(nums)), 2)
            wrong[i], wrong[j] = wrong[j], wrong[i]
        return ", ".join(wrong)


class CountLetters(Task):
    def __init__(self, min_len: int = 4, max_len: int = 9):
        super().__init__(name="count_letters")
        self.min_len, self.max_len = min_len, max_len

    def question(self, rng):
        # Letters drawn from a random 5-letter alphabet so that repeats (counts of 2-5) are common; the asked
        # letter is absent one time in five.
        word = _letters(rng, self.min_len, self.max_len, "".join(rng.sample(LETTERS, 5)))
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(LETTERS)
        return f"How many times does the letter {letter} appear in: {' '.join(word)}?", str(
            word.count(letter)
        )

    def wrong_answer(self, record, rng):
        value = self.expected(record)
        return str(value + 1 if value == 0 or rng.random() < 0.5 else value - 1)


class CountWords(Task):
    def __init__(self, max_words: int = 8):
        super().__init__(name="count_words")
        self.max_words = max_words

    def question(self, rng):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, self.max_words))]
        return f"How many words are in this text: {' '.join(words)}?", str(len(words))

    def wrong_answer(self, record, rng):
        value = self.expected(record)
        return str(value + 1 if value == 1 or rng.random() < 0.5 else value - 1)


class UnitConversion(Task):
    def __init__(self, max_value: int = 999, max_value_non_decimal: int = 20):
        super().__init__(name="unit_conversion")
        self.max_value, self.max_value_non_decimal = max_value, max_value_non_decimal

    def question(self, rng):
        (src, dst), factor = rng.choice(list(UNITS.items()))
        # Powers of ten shift digits, so any value works; x60 and x12 are real multiplications, kept small.
        v = rng.randint(1, self.max_value if factor in (10, 100, 1000) else self.max_value_non_decimal)
        return f"Convert {v} {src} to {dst}.", str(v * factor)

    def wrong_answer(self, record, rng):
        value = self.expected(record)
        return str(rng.choice([value * 10, value // 10 if value >= 10 else value + 1, _off_by(value, rng)]))


class JsonShape(Task):
    """Answer as a JSON object with exactly the requested keys."""

    def __init__(self):
        super().__init__(name="json", instruction='Answer with a JSON object with keys "name" and "age".')

    def question(self, rng):
        name, age = rng.choice(NAMES), rng.randint(18, 90)
        city = rng.choice(CITIES)
        return f"{name} is {age} years old and lives in {city}.", json.dumps({"name": name, "age": age})

    def parse(self, completion):
        text = completion.strip()
        m = re.search(r"\{.*?\}", text, flags=re.S)
        if not m:
            return None
        try:
            obj = json.loads(m.group())
        except json.JSONDecodeError:
            return None
        return obj if isinstance(obj, dict) else None

    def format_ok(self, completion):
        try:
            obj = json.loads(completion.strip())
        except json.JSONDecodeError:
            return False
        return isinstance(obj, dict) and sorted(obj) == ["age", "name"] and isinstance(obj["age"], int)

    def wrong_answer(self, record, rng):
        obj = json.loads(record["answer"])
        if rng.random() < 0.5:
            obj["age"] = _off_by(obj["age"], rng)
        else:
            obj["name"] = rng.choice([n for n in NAMES if n != obj["name"]])
        return json.dumps(obj)

    def badly_formatted(self, record, rng):
        obj = json.loads(record["answer"])
        return f"name: {obj['name']}, age: {obj['age']}"


class ExtractField(Task):
    """Pull one field out of a short semi-structured text."""

    fields = ("name", "city", "job")

    def __init__(self):
        super().__init__(name="extract", instruction="Answer with the value only.", format_re=r"[A-Za-z]+")

    def question(self, rng):
        values = {"name": rng.choice(NAMES), "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
        order = list(self.fields)
        rng.shuffle(order)
        text = "; ".join(f"{k.capitalize()}: {values[k]}" for k in order)
        field = rng.choice(self.fields)
        return f"Text: {text}. What is the {field}?", values[field]

    def parse(self, completion):
        m = re.search(r"[A-Za-z]+", completion.strip())
        return m.group() if m else None

    def expected(self, record):
        return record["answer"]

    def wrong_answer(self, record, rng):
        # Another value from the same text: the classic extraction mistake.
        values = re.findall(r"(?:Name|City|Job): ([A-Za-z]+)", record["prompt"])
        others = [v for v in values if v != record["answer"]]
        return rng.choice(others) if others else record["answer"] + "s"
