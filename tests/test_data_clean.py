"""Cleaning stage: each filter removes what it should and keeps good text; the report adds up."""

from __future__ import annotations

import json
import re

import pytest

from llmlab.config import build_config
from llmlab.data.clean import (
    CLEAN_PRESETS,
    CleanConfig,
    clean_documents,
    exact_key,
    near_duplicates,
    normalize_whitespace,
    quality_reject_reason,
    scrub_pii,
    shingle_hashes,
    strip_boilerplate,
    strip_markup,
)
from llmlab.data.corpora import load_corpus, load_documents
from llmlab.errors import ConfigError


@pytest.fixture(scope="module")
def stories() -> list[str]:
    return load_corpus("tinystories")


# ================================================================================================= PII
@pytest.mark.parametrize(
    "text, kind",
    [
        ("write to john.smith+news@example.co.uk today", "email"),
        ("Contact: a_b-c@sub.domain.org.", "email"),
        ("call (555) 123-4567 now", "phone"),
        ("call 555-123-4567.", "phone"),
        ("call 555.123.4567", "phone"),
        ("ring +44 20 7946 0958 please", "phone"),
        ("ring +1 (415) 555-2671", "phone"),
        ("UK office 020 7946 0958", "phone"),
        ("server at 192.168.0.1.", "ipv4"),
        ("ping 8.8.8.8 and", "ipv4"),
        ("host 2001:db8:85a3::8a2e:370:7334 is up", "ipv6"),
        ("link-local fe80::1ff:fe23:4567:890a here", "ipv6"),
        ("full 2001:0db8:0000:0000:0000:ff00:0042:8329", "ipv6"),
    ],
)
def test_pii_positive(text: str, kind: str) -> None:
    out, counts = scrub_pii(text)
    assert counts[kind] == 1, (text, out, counts)
    assert sum(counts.values()) == 1
    assert {"email": "<EMAIL>", "phone": "<PHONE>", "ipv4": "<IP>", "ipv6": "<IP>"}[kind] in out


@pytest.mark.parametrize(
    "text",
    [
        "On 2024-01-15 and 15/01/2024 and 01.02.2023 we met.",
        "Genesis 1:1 and John 3:16 and 24:34.",
        "It cost $1,234,567.89 in 1999-2000, about 3.14159 per unit.",
        "Version 1.2.3 was released; ISBN 978-3-16-148410-0.",
        "The meeting is at 12:30:45 or 10:30.",
        "A C++ call std::vector::push_back and a::b.",
        "Population 8 000 000; room 101; page 256.1.1.1 is not an address.",
        "The years 1914 1918 1939 1945 and 2001.",
        "Send it @ noon to the user@localhost admin.",
    ],
)
def test_pii_negative(text: str) -> None:
    out, counts = scrub_pii(text)
    assert out == text, counts
    assert sum(counts.values()) == 0


# ========================================================================================= boilerplate
def test_gutenberg_header_footer_markers() -> None:
    book = (
        "The Project Gutenberg EBook of Walden\n\nThis eBook is for the use of anyone anywhere.\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK WALDEN ***\n\nWhen I wrote the following pages, "
        "I lived alone, in the woods.\n\n*** END OF THIS PROJECT GUTENBERG EBOOK WALDEN ***\n\nUpdated editions..."
    )
    out = strip_boilerplate(book)
    assert "When I wrote the following pages" in out
    assert "Gutenberg" not in out and "Updated editions" not in out


def test_boilerplate_lines_removed_good_lines_kept() -> None:
    good = [
        "The copyright of the poem passed to his widow in 1901.",
        "Copyright law changed a great deal in that century.",
        "She told him to click the latch here and go in.",
        "They ate cookies and milk by the fire.",
    ]
    bad = [
        "Copyright 2023 Acme Corp. All rights reserved.",
        "© 2019 Example Media",
        "Click here to subscribe!",
        "This site uses cookies to improve your experience. Accept all cookies",
        "Sign up for our newsletter",
        "Privacy Policy | Terms of Service",
        "Please enable JavaScript to view the comments.",
        "Skip to main content",
    ]
    text = "\n".join([good[0], bad[0], good[1], bad[1], bad[2], good[2], *bad[3:], good[3]])
    out = strip_boilerplate(text)
    assert out.split("\n") == good
    assert strip_boilerplate("\n".join(good)) == "\n".join(good)


def test_gutenberg_licence_on_real_book() -> None:
    """chesterton-ball.txt ends with the PG licence: it is cut, and the rest of the book is kept."""
    docs = [d.text for d in load_documents("gutenberg") if d.source.endswith("chesterton-ball.txt")]
    assert any("PROJECT GUTENBERG" in d.upper() for d in docs)
    result = clean_documents(docs, CleanConfig(quality=False, dedup_near=False))
    assert not any("gutenberg" in d.lower() for d in result.texts)
    assert result.report.stage("boilerplate").docs_removed >= 2
    assert len(result.texts) >= len(docs) - 5
    assert any("Turnbull" in d for d in result.texts)  # the story itself survives


# ============================================================================================== markup
def test_strip_html() -> None:
    html = (
        "<html><head><style>p {color: red}</style><script>var x = '<p>';</script></head><body>"
        "<h1>Title</h1><p>Fish &amp; chips &mdash; &#169; <b>tasty</b> <a href='x'>link</a>.</p>"
        "<!-- hidden --><div>Second<br/>line</div></body></html>"
    )
    out = normalize_whitespace(strip_markup(html))
    assert out == "Title\n\nFish & chips \u2014 \u00a9 tasty link.\n\nSecond\nline"


def test_markup_keeps_non_html_angle_brackets() -> None:
    text = "Robert <unk> = 3 < 4 > 2, a <|im_end|> marker, <EMAIL> and x<y."
    assert strip_markup(text) == text


def test_strip_markdown_and_wiki() -> None:
    md = "# Heading\n\nSee the **docs** at [our site](https://example.com) ![logo](img.png).\n```python\nx = 1\n```"
    assert normalize_whitespace(strip_markup(md)) == "Heading\n\nSee the docs at our site logo.\nx = 1"
    wiki = "'''Paris''' is the [[capital city|capital]] of [[France]].{{citation needed}}[3] ''Ville''.[edit]"
    assert strip_markup(wiki) == "Paris is the capital of France. Ville."
    # Text that merely uses underscores/asterisks or numbered items is left alone.
    keep = "the _______ regiment\n[1] First item\n* a bullet"
    assert strip_markup(keep) == keep


# ============================================================================================= quality
def _para(stories: list[str], n: int = 3) -> str:
    return normalize_whitespace(" ".join(stories[:n]))


def _long_line(good: str) -> str:
    """One line a third as long as ``good`` (three copies: few duplicate lines, many duplicate characters)."""
    words = load_corpus("wikitext2-valid")[3].split()
    return " ".join(words)[: len(good) // 3]


def test_quality_keeps_real_text(stories: list[str]) -> None:
    cfg = CleanConfig()
    docs = [normalize_whitespace(s) for s in stories[:300]]
    rejected = [d for d in docs if quality_reject_reason(d, cfg)]
    assert len(rejected) <= 3  # one very short story, ~1 repetitive one


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda good: "Buy now. The best deal.", "min_words"),
        (lambda good: " ".join(["the internationalization of characteristically"] * 40), "mean_word_len"),
        (lambda good: good + " " + "#tag #deal #sale " * 60, "symbol_word_ratio"),
        (lambda good: good + "\n" + " ".join(str(1000 + i) for i in range(600)), "alpha_word_frac"),
        (lambda good: " ".join(f"purple{i} elephant{i} dances{i}" for i in range(60)), "stop_words"),
        (
            lambda good: "\n".join(f"- item number {i} of the list with the rest" for i in range(60)),
            "bullet_lines",
        ),
        (
            lambda good: (
                good
                + "\n"
                + "\n".join(
                    f"and then the story number {i} of the old man went on and on..." for i in range(30)
                )
            ),
            "ellipsis_lines",
        ),
        (lambda good: good + "\n" + "\n".join(["Home", "About us", "Contact"] * 30), "dup_line_frac"),
        (lambda good: good + ("\n" + _long_line(good)) * 3, "dup_line_chars"),
    ],
)
def test_quality_rules_reject(stories: list[str], make, reason: str) -> None:
    good = _para(stories)
    assert quality_reject_reason(good, CleanConfig()) is None
    assert good.count("\n") >= 8  # several lines, so the line rules have something to compare
    assert quality_reject_reason(make(good), CleanConfig()) == reason


def test_repeated_ngram_rules(stories: list[str]) -> None:
    good = _para(stories, 4)
    words = good.split()
    # One phrase repeated within running text (not on its own line): caught by the n-gram rules.
    spam = " ".join(words[:200] + ["buy the cheap pills from the shop today"] * 25 + words[200:])
    assert quality_reject_reason(spam, CleanConfig()).startswith(("top_", "dup_"))
    # A long passage duplicated verbatim: caught by duplicate n-grams.
    doubled = " ".join(words[:150] * 2)
    assert quality_reject_reason(doubled, CleanConfig()).startswith("dup_")


# =============================================================================================== dedup
def test_exact_dedup_normalizes(stories: list[str]) -> None:
    a = stories[5]
    b = "  " + a.upper().replace(",", "").replace("\n", "   ") + "!"
    assert exact_key(a) == exact_key(b)
    assert exact_key(a) != exact_key(stories[6])


def test_near_duplicate_of_lightly_edited_copy(stories: list[str]) -> None:
    docs = [s for s in stories if len(s.split()) > 200][:40]
    original = docs[7]
    words = original.split()
    edited = words[:]
    for i in range(0, len(edited), 60):  # a handful of word substitutions
        edited[i] = "banana"
    edited = " ".join(edited[:-3]) + " The end."
    dups = near_duplicates([*docs, edited], threshold=0.7)
    assert dups == [len(docs)]
    # Unrelated stories, even of one genre with shared phrases, are not flagged.
    assert near_duplicates(docs, threshold=0.7) == []


def test_minhash_estimates_true_jaccard(stories: list[str]) -> None:
    """The MinHash built from our shingle hashes estimates the exact Jaccard of the shingle sets."""
    from datasketch import MinHash

    from llmlab.data.clean import _identity

    base = stories[20].split()
    variants = [" ".join(base), " ".join(base[:-30]), " ".join(base[40:]), " ".join(base[::2]), stories[21]]
    sets = [set(shingle_hashes(v, 5).tolist()) for v in variants]
    hashes = []
    for shingle_set in sets:
        mh = MinHash(num_perm=256, seed=1, hashfunc=_identity)
        mh.update_batch(list(shingle_set))
        hashes.append(mh)
    for i in range(1, len(variants)):
        exact = len(sets[0] & sets[i]) / len(sets[0] | sets[i])
        assert abs(hashes[0].jaccard(hashes[i]) - exact) < 0.1, (i, exact)
    words = re.findall(r"\w+", variants[0].lower())
    assert len(sets[0]) == len({tuple(words[i : i + 5]) for i in range(len(words) - 4)})  # one per 5-gram


# ============================================================================================= report
def test_pipeline_report_adds_up(stories: list[str], tmp_path) -> None:
    good = [normalize_whitespace(s) for s in stories[:60] if len(s.split()) > 80][:30]
    other = normalize_whitespace(stories[100])
    docs = [
        *good,
        good[0],  # exact duplicate
        good[1].upper(),  # duplicate after normalization
        " ".join(good[2].split()[:-2]) + " Fin.",  # near duplicate
        "tiny",  # too short
        "<p>" + other.replace("Once", "<b>Once</b>") + " Mail me at kid@example.com or 555-123-4567.</p>",
        "Copyright 2020 Foo Inc. All rights reserved.",  # only boilerplate
        "",  # empty
    ]
    result = clean_documents(docs, CleanConfig(near_threshold=0.8))
    r = result.report
    assert r.docs_in == len(docs)
    assert r.docs_in - sum(s.docs_removed for s in r.stages) == r.docs_out == len(result.texts)
    assert r.bytes_in - sum(s.bytes_removed for s in r.stages) == r.bytes_out
    assert r.bytes_out == sum(len(t.encode()) for t in result.texts)
    assert r.stage("dedup/exact").docs_removed == 2
    assert r.stage("dedup/near").docs_removed == 1
    assert r.stage("quality/min_words").docs_removed == 1
    assert r.stage("boilerplate").docs_removed == 1
    assert r.stage("empty").docs_removed == 1
    assert r.pii["email"] == 1 and r.pii["phone"] == 1
    assert r.stage("markup").docs_modified == 1
    scrubbed = result.texts[result.index.index(len(good) + 4)]
    assert scrubbed.startswith("Once upon a time") and scrubbed.endswith("Mail me at <EMAIL> or <PHONE>.")
    assert "<EMAIL>" in scrubbed and "<PHONE>" in scrubbed and "<b>" not in scrubbed
    assert result.index[: len(good)] == list(range(len(good)))
    table = r.table()
    assert "dedup/near" in table and "kept" in table and "email 1" in table
    r.save(tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["docs_out"] == r.docs_out and len(saved["stages"]) == len(r.stages)


def test_real_corpora_mostly_kept() -> None:
    for name, min_kept in [("tinystories", 0.98), ("wikitext2-valid", 0.95)]:
        docs = load_corpus(name)
        result = clean_documents(docs)
        assert result.report.docs_out >= min_kept * len(docs), (name, result.report.table())
        assert result.report.pii == {"email": 0, "phone": 0, "ipv4": 0, "ipv6": 0}


def test_config_presets_and_errors() -> None:
    cfg = build_config(CleanConfig, CLEAN_PRESETS, "light", None, ["near_threshold=0.9", "min_words=5"])
    assert cfg.quality is False and cfg.near_threshold == 0.9 and cfg.min_words == 5
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        build_config(CleanConfig, CLEAN_PRESETS, "default", None, ["bogus=1"])
    with pytest.raises(ConfigError, match="near_threshold"):
        build_config(CleanConfig, CLEAN_PRESETS, "default", None, ["near_threshold=1.5"])
    with pytest.raises(ConfigError, match="same length"):
        build_config(CleanConfig, CLEAN_PRESETS, "default", None, ["dup_ngram_n=5,6"])
    none = clean_documents(["a", "a", "<b>x</b>"], CLEAN_PRESETS["none"])
    assert none.texts == ["a", "a", "<b>x</b>"]
