"""The real-text RAG eval: a corpus cut from the bundled Wikipedia and Gutenberg text, and cloze questions on it.

Corpus (:func:`write_eval_corpus`, deterministic): the first ``WIKI_ARTICLES`` WikiText-2 *test* articles
whose title has no ``<unk>``, detokenized (``" @-@ "`` -> ``"-"``, ``" , "`` -> ``", "``, ...), one file each
under ``wiki/``; and from the NLTK Gutenberg selection the books in ``BOOKS``, each cut to its first
``max_chars`` characters at a paragraph break, under ``gutenberg/``.

Questions (:func:`generate_qa`, the documented procedure that produced ``llmlab/assets/rag/qa_real.jsonl``):

1. split every corpus file into sentences (:func:`llmlab.apps.rag.chunking.sentence_spans`);
2. keep sentences of 12-40 words with no ``<unk>`` and no ``=`` heading;
3. in each, the answer candidate is the first capitalized multi-word name not at the sentence start
   (``Du Fu``, ``Father Brown``), else the first 3-4 digit number (a year, a count); it must occur once in the
   sentence, not follow a line or clause break or a quote, and not start with a stop word ("And the Angel");
4. shuffle the candidates with ``random.Random(SEED)`` and take them in order, at most ``MAX_PER_FILE`` per file,
   until ``WIKI_QUESTIONS`` from wiki/ and ``BOOK_QUESTIONS`` from gutenberg/;
5. the question is ``Fill in the blank: <sentence with the answer replaced by _____>`` (whitespace runs, such as
   Gutenberg's hard line breaks, become one space); the gold passage is the
   sentence's character span in its file; ``answer_span`` is the answer's span. ``short_question`` keeps only
   ``SHORT_WINDOW`` words either side of the blank: fewer shared words, a harder retrieval test.

Being cloze questions, they share many words with their passage: that favours lexical (BM25) retrieval, which
the report says next to the figures.
"""

from __future__ import annotations

import json
import random
import re
import zipfile
from pathlib import Path

from llmlab.apps.rag.chunking import sentence_spans
from llmlab.apps.rag.support import STOP_WORDS
from llmlab.data.corpora import _wiki_articles, corpus_path, read_text

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "rag"
QA_FILE = ASSETS / "qa_real.jsonl"
SEED = 19
WIKI_ARTICLES = 10
BOOKS = {"chesterton-brown.txt": 100_000, "blake-poems.txt": 40_000}
WIKI_QUESTIONS = 100
BOOK_QUESTIONS = 40
MAX_PER_FILE = {"wiki": 14, "gutenberg": 35}  # spread the questions over the files
BLANK = "_____"
SHORT_WINDOW = 4

_NAME = re.compile(r"\b[A-Z][a-z]+(?: (?:of |de |the )?[A-Z][a-z]+)+\b")
_NUMBER = re.compile(r"(?<![\d,.])\d{3,4}(?![\d]|[,.]\d)")  # not part of 207,000 or 3.1415
_DETOK = [
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
    (" : ", ": "), (" 's", "'s"), (" n't", "n't"), ("( ", "("), (" )", ")"), (" %", "%"), ("$ ", "$"),
]  # fmt: skip


def detokenize_wikitext(text: str) -> str:
    """WikiText-2's tokenized spacing back to ordinary prose (approximately; deterministic)."""
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        for a, b in _DETOK:
            line = line.replace(a, b)
        line = re.sub(r" ([.,;:!?])(?=\s|$)", r"\1", line)
        line = re.sub(r'" (.*?) "', r'"\1"', line)
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_")[:40]


def write_eval_corpus(out: Path) -> Path:
    """Write the eval corpus under ``out`` (idempotent: same bytes every time) and return ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "wiki").mkdir(exist_ok=True)
    (out / "gutenberg").mkdir(exist_ok=True)
    written = 0
    for article in _wiki_articles(read_text("wikitext2-test")):
        title = article.strip().split("\n", 1)[0].strip(" =")
        if "<unk>" in title:
            continue
        path = out / "wiki" / f"{written:02d}_{_slug(title)}.txt"
        text = detokenize_wikitext(article).replace("= = ", "== ").replace(" = =", " ==")
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        written += 1
        if written == WIKI_ARTICLES:
            break
    with zipfile.ZipFile(corpus_path("gutenberg")) as zf:
        for name, max_chars in BOOKS.items():
            text = zf.read(f"gutenberg/{name}").decode("utf-8").replace("\r\n", "\n")
            if len(text) > max_chars:
                text = text[: text.rfind("\n\n", 0, max_chars) + 1]
            path = out / "gutenberg" / name
            if not path.is_file() or path.read_text() != text:
                path.write_text(text)
    return out


def short_cloze(before: str, after: str) -> str:
    """The harder variant: only ``SHORT_WINDOW`` words either side of the blank."""
    left, right = " ".join(before.split()[-SHORT_WINDOW:]), " ".join(after.split()[:SHORT_WINDOW])
    glue = " " if after[:1].isspace() else ""  # "_____." stays attached to its punctuation
    return f"Fill in the blank: ... {left} {BLANK}{glue}{right} ..."


def _candidate(sentence: str) -> re.Match | None:
    words = sentence.split()
    if not 12 <= len(words) <= 40 or "<unk>" in sentence or "=" in sentence:
        return None
    for pattern in (_NAME, _NUMBER):
        for m in pattern.finditer(sentence):
            before = sentence[: m.start()].rstrip(" ")
            if not before or before[-1] in ".!?;:\n\"'" or sentence.count(m.group()) != 1:
                continue  # a capital after a line or clause break is not a name ("And the Angel")
            if m.group().split()[0].lower() in STOP_WORDS:
                continue
            return m
    return None


def generate_qa(corpus: Path) -> list[dict]:
    """The cloze QA set over the corpus written by :func:`write_eval_corpus` (see the module docstring)."""
    pools: dict[str, list[dict]] = {"wiki": [], "gutenberg": []}
    for path in sorted(corpus.rglob("*.txt")):
        rel = path.relative_to(corpus).as_posix()
        text = path.read_text()
        for a, b in sentence_spans(text):
            m = _candidate(text[a:b])
            if m is None:
                continue
            sentence = text[a:b]
            pools[rel.split("/")[0]].append(
                {
                    "source": rel,
                    "question": "Fill in the blank: "
                    + " ".join(f"{sentence[: m.start()]}{BLANK}{sentence[m.end() :]}".split()),
                    "short_question": short_cloze(sentence[: m.start()], sentence[m.end() :]),
                    "answer": m.group(),
                    "span": [a, b],
                    "answer_span": [a + m.start(), a + m.end()],
                }
            )
    rng = random.Random(SEED)
    items: list[dict] = []
    for pool, quota in (("wiki", WIKI_QUESTIONS), ("gutenberg", BOOK_QUESTIONS)):
        candidates = pools[pool]
        rng.shuffle(candidates)
        per_file: dict[str, int] = {}
        taken = 0
        for c in candidates:
            if taken == quota:
                break
            if per_file.get(c["source"], 0) >= MAX_PER_FILE[pool]:
                continue
            per_file[c["source"]] = per_file.get(c["source"], 0) + 1
            items.append({"id": f"real-{len(items):03d}", **c})
            taken += 1
    return items


def load_qa(path: Path = QA_FILE) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_qa(items: list[dict], path: Path = QA_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
