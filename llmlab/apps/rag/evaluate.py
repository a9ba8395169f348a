"""``llmlab rag eval``: retrieval quality, answer quality with and without retrieval, support, latency.

Metrics (pure functions below):

- ``recall@k``: fraction of questions whose gold answer span lies inside one of the top-k returned passages
  (same file, ``hit.span`` covering ``answer_span``); ``MRR@10 = mean(1 / rank of the first such passage)``
  (0 when none in the top 10);
- ``EM``: SQuAD-normalized answer (lower-cased, punctuation, articles and citation markers removed) equals the
  gold answer; ``F1``: SQuAD token F1; ``contains``: the normalized gold answer occurs in the normalized answer
  (the fair measure for a chat model that answers in a sentence);
- ``unsupported rate``: flagged sentences / judged sentences (:mod:`llmlab.apps.rag.support`).

Two sets: the real cloze set (:mod:`.qaset`, over bundled Wikipedia/Gutenberg text; retrieval is also
measured with its short-window variant, which shares fewer words with the passage) and the synthetic
invented-entity set (:mod:`.synthetic`), each indexed once under ``work`` (re-runs reuse the index).
``calibrate=True`` sets the support thresholds from the synthetic answers: sentences of open-book answers that
contain the gold answer are the supported class, closed-book answers that miss it (hallucinations about
entities that do not exist) the unsupported class, both judged against the question's retrieved sources.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmlab.apps.embeddings import load_embedder
from llmlab.apps.rag import qaset, synthetic
from llmlab.apps.rag.answer import build_messages, generate_answers
from llmlab.apps.rag.hits import Hit
from llmlab.apps.rag.search import MODES, RagIndex, open_index
from llmlab.apps.rag.store import build_index
from llmlab.apps.rag.support import (
    THRESHOLDS_FILE,
    SupportThresholds,
    calibrate,
    is_supported,
    judged_sentences,
    strip_citations,
    support_features,
)

MIN_CALIBRATION = 10  # examples of each class needed to recalibrate the support thresholds
EVAL_INSTRUCTION = " Answer with only the missing words or the short answer."


# ------------------------------------------------------------------------------------------- metrics
def normalize_answer(text: str) -> str:
    """SQuAD normalization, plus citation markers removed."""
    text = strip_citations(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between the normalized prediction and gold answer."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, gold: str) -> float:
    return float(f" {normalize_answer(gold)} " in f" {normalize_answer(prediction)} ")


def first_relevant_rank(hits: Sequence[Hit], source: str, answer_span: Sequence[int]) -> int | None:
    """1-based rank of the first hit from ``source`` whose span covers ``answer_span``, else None."""
    for rank, h in enumerate(hits, start=1):
        if h.rel == source and h.span[0] <= answer_span[0] and answer_span[1] <= h.span[1]:
            return rank
    return None


def retrieval_metrics(ranks: Sequence[int | None], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """recall@k for each k and MRR@max(ks) from the first-relevant ranks (None = not retrieved)."""
    n = max(1, len(ranks))
    out = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n for k in ks}
    out["mrr"] = sum(1.0 / r for r in ranks if r is not None and r <= max(ks)) / n
    return out


def answer_metrics(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    n = max(1, len(golds))
    return {
        "em": sum(map(exact_match, predictions, golds)) / n,
        "f1": sum(map(token_f1, predictions, golds)) / n,
        "contains": sum(map(contains, predictions, golds)) / n,
    }


# ------------------------------------------------------------------------------------------- runs
def _retrieval(index: RagIndex, items: list[dict], mode: str, llm: Any = None, rerank: bool = False) -> dict:
    ranks, t0 = [], time.perf_counter()
    for it in items:
        hits = index.search(it["question"], k=10, mode=mode, llm=llm, rerank=rerank, rerank_depth=10)
        ranks.append(first_relevant_rank(hits, it["source"], it["answer_span"]))
    return {
        **retrieval_metrics(ranks),
        "ms_per_query": 1000 * (time.perf_counter() - t0) / max(1, len(items)),
    }


def expansion_retrieval(
    index: RagIndex, items: list[dict], llm: Any, how: str | None, modes: Sequence[str] = ("dense", "hybrid")
) -> dict[str, dict]:
    """Retrieval metrics per mode with LLM query expansion ``how`` (None: the plain question). The
    expansions are written once, in one batched generate, and shared by the modes; ``ms_per_query`` is that
    generation amortized over the questions plus the mode's own search time."""
    from llmlab.apps.rag.query import expand_many, expanded_ranking  # needs the engine

    t0 = time.perf_counter()
    extras = expand_many(llm, [it["question"] for it in items], how) if how else [None] * len(items)
    generate_ms = 1000 * (time.perf_counter() - t0) / max(1, len(items))
    out = {}
    for mode in modes:
        ranks, t1 = [], time.perf_counter()
        for it, extra in zip(items, extras, strict=True):
            if how:
                hits = index.hits(expanded_ranking(index, it["question"], 10, mode, llm, how, extra), 10)
            else:
                hits = index.search(it["question"], k=10, mode=mode)
            ranks.append(first_relevant_rank(hits, it["source"], it["answer_span"]))
        search_ms = 1000 * (time.perf_counter() - t1) / max(1, len(items))
        out[mode] = {**retrieval_metrics(ranks), "ms_per_query": generate_ms + search_ms,
                     "generate_ms_per_query": generate_ms}  # fmt: skip
    out["examples"] = [{"question": it["question"], "expansion": e} for it, e in list(zip(items, extras))[:3]]
    return out


def single_query_ms(
    index: RagIndex, items: list[dict], llm: Any, how: str | None, mode: str = "hybrid"
) -> float:
    """Mean latency of one unbatched ``index.search`` (expansion included), as ``llmlab rag ask`` pays it."""
    t0 = time.perf_counter()
    for it in items:
        index.search(it["question"], k=10, mode=mode, llm=llm, expand=how)
    return 1000 * (time.perf_counter() - t0) / max(1, len(items))


def _answers(llm: Any, index: RagIndex, items: list[dict], k: int, max_tokens: int) -> dict:
    """Closed-book and open-book answers, their metrics, support features and latency."""
    questions = [it["question"] + EVAL_INSTRUCTION for it in items]
    golds = [it["answer"] for it in items]
    t0 = time.perf_counter()
    closed = generate_answers(llm, [build_messages(q, []) for q in questions], max_tokens)
    t1 = time.perf_counter()
    hit_lists = [index.search(it["question"], k=k, mode="hybrid") for it in items]
    opened = generate_answers(llm, [build_messages(q, h) for q, h in zip(questions, hit_lists)], max_tokens)
    t2 = time.perf_counter()
    support = []  # (book, sentence features rows, gold contained?) for every judged sentence
    for book, answers in (("closed", closed), ("open", opened)):
        for ans, hits, gold in zip(answers, hit_lists, golds):
            sents = judged_sentences(ans)
            rows = support_features(sents, [h.text for h in hits], index.embedder)
            support += [(book, row, bool(contains(ans, gold))) for row in rows]
    n = max(1, len(items))
    return {
        "closed_book": answer_metrics(closed, golds),
        "open_book": answer_metrics(opened, golds),
        "closed_s_per_question": (t1 - t0) / n,
        "open_s_per_question": (t2 - t1) / n,
        "examples": [
            {"question": it["question"], "gold": g, "closed": c, "open": o}
            for it, g, c, o in list(zip(items, golds, closed, opened))[:5]
        ],
        "_support": support,
    }


def _unsupported_rates(support: list, thresholds: SupportThresholds) -> dict[str, float]:
    out = {}
    for book in ("closed", "open"):
        rows = [row for b, row, _ in support if b == book]
        flagged = sum(not any(is_supported(f, thresholds) for f in row) for row in rows)
        out[f"unsupported_rate_{book}"] = flagged / max(1, len(rows))
        out[f"judged_sentences_{book}"] = len(rows)
    return out


def run_eval(
    model: str,
    work: Path,
    *,
    limit: int | None = None,
    answer_limit: int = 40,
    rerank_limit: int = 20,
    k: int = 4,
    max_tokens: int = 24,
    calibrate_support: bool = False,
    llm: Any = None,
) -> dict[str, Any]:
    """The whole evaluation (see the module docstring); returns the report dict."""
    from llmlab.infer import LLM  # torch: only when evaluating

    embedder = load_embedder()
    llm = llm if llm is not None else LLM(model, max_batch_size=16)
    report: dict[str, Any] = {"model": str(model), "k": k, "max_tokens": max_tokens}

    real_dir = qaset.write_eval_corpus(work / "real_corpus")
    stats = build_index(real_dir, work / "real.index", embedder)
    real = open_index(work / "real.index", embedder)
    items = qaset.load_qa()[:limit]
    report["real"] = {"questions": len(items), "chunks": stats.chunks, "index_seconds": stats.seconds}
    short_items = [{**it, "question": it["short_question"]} for it in items]
    for mode in MODES:
        report["real"][mode] = _retrieval(real, items, mode)
        report["real"][f"{mode}_short"] = _retrieval(real, short_items, mode)
    subset = items[:rerank_limit]
    report["real"]["hybrid_on_rerank_subset"] = _retrieval(real, subset, "hybrid")
    report["real"]["reranked"] = {**_retrieval(real, subset, "hybrid", llm, True), "questions": len(subset)}
    real_answers = _answers(llm, real, items[:answer_limit], k, max_tokens)

    files, qas = synthetic.make_corpus()
    syn_dir = synthetic.write_corpus(work / "synthetic_corpus", files)
    build_index(syn_dir, work / "synthetic.index", embedder)
    syn = open_index(work / "synthetic.index", embedder)
    syn_items = [{"question": q.question, "answer": q.answer, "source": q.source} for q in qas][:limit]
    syn_answers = _answers(llm, syn, syn_items[:answer_limit], k, max_tokens)

    rows = [(row, ok) for b, row, ok in syn_answers["_support"] if (b == "open") == ok]
    if calibrate_support and min(sum(ok for _, ok in rows), sum(not ok for _, ok in rows)) < MIN_CALIBRATION:
        report["calibration"] = {
            "skipped": f"fewer than {MIN_CALIBRATION} examples of a class",
            "pairs": len(rows),
        }
    elif calibrate_support:
        thresholds, balanced = calibrate([r for r, _ in rows], [ok for _, ok in rows])
        THRESHOLDS_FILE.write_text(
            json.dumps(
                {"similarity": thresholds.similarity, "overlap": thresholds.overlap,
                 "balanced_accuracy": round(balanced, 4), "positives": sum(ok for _, ok in rows),
                 "negatives": sum(not ok for _, ok in rows), "model": str(model),
                 "how": "llmlab rag eval --calibrate (synthetic set; see llmlab/apps/rag/evaluate.py)"},
                indent=2,
            ) + "\n"
        )  # fmt: skip
        report["calibration"] = {"balanced_accuracy": balanced, "pairs": len(rows)}
    thresholds = SupportThresholds.load()
    report["support_thresholds"] = {"similarity": thresholds.similarity, "overlap": thresholds.overlap}
    for name, res in (("real", real_answers), ("synthetic", syn_answers)):
        support = res.pop("_support")
        report.setdefault(name, {}).update({"answers": res, **_unsupported_rates(support, thresholds)})
    report["synthetic"]["questions"] = len(syn_items[:answer_limit])
    report["real"]["answered_questions"] = len(items[:answer_limit])
    return report


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of the report."""
    r = report["real"]
    lines = [f"RAG eval, model {report['model']}, {r['questions']} real questions, {r['chunks']} chunks", ""]
    lines.append(f"{'retrieval':<34}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'MRR':>7}{'ms/q':>9}")
    rows = [(m, r[m]) for m in MODES] + [(f"{m}, short cloze", r[f"{m}_short"]) for m in MODES]
    rows += [(f"hybrid (first {r['reranked']['questions']})", r["hybrid_on_rerank_subset"])]
    rows += [(f"hybrid+LLM rerank (first {r['reranked']['questions']})", r["reranked"])]
    for name, m in rows:
        lines.append(
            f"{name:<34}{m['recall@1']:>7.3f}{m['recall@5']:>7.3f}{m['recall@10']:>7.3f}{m['mrr']:>7.3f}"
            f"{m['ms_per_query']:>9.1f}"
        )
    n_ans = (r["answered_questions"], report["synthetic"]["questions"])
    lines += ["", f"answers: first {n_ans[0]} real and {n_ans[1]} synthetic questions", ""]
    lines += [f"{'answers':<28}{'EM':>7}{'F1':>7}{'contains':>9}{'unsupp.':>9}{'s/q':>7}"]
    for set_name in ("real", "synthetic"):
        s = report[set_name]
        for book in ("closed", "open"):
            a = s["answers"][f"{book}_book"]
            lines.append(
                f"{set_name + ' ' + book + '-book':<28}{a['em']:>7.3f}{a['f1']:>7.3f}{a['contains']:>9.3f}"
                f"{s[f'unsupported_rate_{book}']:>9.3f}{s['answers'][f'{book}_s_per_question']:>7.2f}"
            )
    return "\n".join(lines)
