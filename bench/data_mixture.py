"""Data mixtures and language identification, measured.

    # language-ID libraries: accuracy and speed on the bundled multilingual sample, one run
    PYTHONPATH=DIR_WITH_THE_LIBRARIES .venv/bin/python bench/data_mixture.py langid

    # 2-3 mixtures of the bundled corpora -> a tiny model each -> held-out loss per domain
    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/data_mixture.py mixtures --steps 150

``langid`` scores every installed backend of :mod:`llmlab.data.langid` on (a) the UDHR sample's documents
(12 languages, ~1,000 characters each) plus English TinyStories/Gutenberg documents and (b) single UDHR
lines of 20-200 characters (short text is where detectors differ). It prints accuracy, texts/s after loading,
and the load time.

``mixtures`` prepares each corpus once with one shared tokenizer, builds token-weighted mixtures with
``llmlab data prepare``'s mixture code, trains the same tiny model on each for the same number of tokens,
and reports the held-out loss on every domain's own val split.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path


def _langid(args: argparse.Namespace) -> None:
    from llmlab.data.corpora import load_documents
    from llmlab.data.langid import BACKENDS, MULTILINGUAL_SAMPLE, detect_languages
    from llmlab.errors import ConfigError

    records = [json.loads(line) for line in gzip.open(MULTILINGUAL_SAMPLE, "rt", encoding="utf-8")]
    english = [d.text for d in load_documents("tinystories")[:40]] + [
        d.text for d in load_documents("gutenberg")[::400][:40]
    ]
    docs = [(r["text"], r["lang"]) for r in records] + [(t, "en") for t in english]
    lines = [
        (line, r["lang"])
        for r in records
        for line in r["text"].splitlines()
        if 20 <= len(line.strip()) <= 200
    ]
    print(f"{len(docs)} documents ({len(records)} UDHR in 12 languages + {len(english)} English), "
          f"{len(lines)} single lines of 20-200 characters")  # fmt: skip
    print("| backend | load s | doc accuracy | docs/s | line accuracy | lines/s |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends.split(",") if args.backends else BACKENDS:
        t0 = time.perf_counter()
        try:
            detect_languages(["warm up the model"], backend)
        except ConfigError as exc:
            print(f"| {backend} | not installed ({exc}) | | | | |")
            continue
        load = time.perf_counter() - t0
        row = [backend, f"{load:.1f}"]
        for texts in (docs, lines):
            t0 = time.perf_counter()
            got = detect_languages([t for t, _ in texts], backend)
            seconds = time.perf_counter() - t0
            acc = sum(g == want for g, (_, want) in zip(got, texts)) / len(texts)
            row += [f"{100 * acc:.1f}%", f"{len(texts) / seconds:,.0f}"]
        print("| " + " | ".join(row) + " |", flush=True)


def _mixtures(args: argparse.Namespace) -> None:
    import torch

    from llmlab.data.corpora import load_documents, split_documents
    from llmlab.data.loader import iterate_split
    from llmlab.data.mixture import prepare_mixture
    from llmlab.data.prepare import prepare_dataset
    from llmlab.loading import load
    from llmlab.recipes.pretrain import load_pretrain_config, run_pretrain
    from llmlab.tokenizer.train import train_tokenizer
    from llmlab.train.evaluation import evaluate_loss

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    corpora = args.corpora.split(",")
    tok_dir = work / "tokenizer"
    if not tok_dir.is_dir():
        sample = [d.text for name in corpora for d in load_documents(name)[:300]]
        train_tokenizer(sample, 4096).save(tok_dir)
    from llmlab.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tok_dir)
    # Each domain's documents split once: mixtures draw from the train part (written as JSONL), every model
    # is scored on the held-out part (prepare_dataset puts 90% of those documents in its val split).
    for name in corpora:
        if not (work / f"val-{name}" / "meta.json").is_file():
            docs = load_documents(name)
            train_idx, val_idx = split_documents(docs, 0.1, seed=0)
            with open(work / f"train-{name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": docs[i].text}) + "\n" for i in train_idx)
            held = [docs[i].text for i in val_idx]
            prepare_dataset(held, tok, work / f"val-{name}", val_fraction=0.9, clean=False, progress=False)
    mixtures = [m.split("+") for m in args.mixtures.split(";")]
    rows = []
    for spec in mixtures:
        label = " + ".join(spec)
        data = work / ("mix-" + "_".join(s.replace(":", "") for s in spec))
        if not (data / "meta.json").is_file():
            files = [f"{work / ('train-' + s.rsplit(':', 1)[0])}.jsonl:{s.rsplit(':', 1)[1]}" for s in spec]
            meta = prepare_mixture(
                files, tok, data, temperature=args.temperature, clean=False, progress=False
            )
        else:
            meta = json.loads((data / "meta.json").read_text())
        out = data.with_name(data.name + "-run")
        overrides = [
            f"data.dir={data}",
            f"max_steps={args.steps}",
            "batch_size=16",
            "seq_len=256",
            "warmup_steps=20",
            "eval_every=0",
            "eval_batches=4",
            "progress=false",
            "tensorboard=false",
        ]
        if not (out / "final" / "config.json").is_file():  # an interrupted bench keeps its finished runs
            run_pretrain(load_pretrain_config("tiny", None, overrides), out)
        model, _ = load(out)
        losses = {}
        for name in corpora:
            batches = iterate_split(work / f"val-{name}", "val", 256, 16, args.eval_batches)
            losses[name] = evaluate_loss(model, batches)["loss"]
        realized = meta["mixture"]["realized"]
        rows.append((label, realized, losses))
        print(f"[bench] {label}: realized {realized} -> {losses}", flush=True)
    print(
        f"\ntiny model, {args.steps} steps x 16 x 256 tokens per mixture; held-out loss (nats/token) per domain"
    )
    print("| mixture (target weights) | realized token shares | " + " | ".join(corpora) + " | mean |")
    print("|---|---|" + "---|" * (len(corpora) + 1))
    for label, realized, losses in rows:
        shares = ", ".join(f"{100 * r:.0f}%" for r in realized)
        mean = sum(losses.values()) / len(losses)
        print(
            f"| {label} | {shares} | " + " | ".join(f"{losses[c]:.3f}" for c in corpora) + f" | {mean:.3f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("langid", help="compare the language-ID libraries")
    p.add_argument("--backends", default=None, help="comma-separated subset of the backends (default: all)")
    p = sub.add_parser("mixtures", help="train on several corpus mixtures, score each domain")
    p.add_argument("--corpora", default="tinystories,tinyshakespeare,wikitext2-valid")
    p.add_argument(
        "--mixtures",
        default="tinystories:1+tinyshakespeare:1+wikitext2-valid:1;tinystories:0.7+tinyshakespeare:0.15+"
        "wikitext2-valid:0.15;tinystories:0.15+tinyshakespeare:0.15+wikitext2-valid:0.7",
        help="';'-separated mixtures of '+'-joined corpus:weight",
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/llmlab-bench/mixtures")
    args = parser.parse_args(argv)
    {"langid": _langid, "mixtures": _mixtures}[args.what](args)


if __name__ == "__main__":
    main()
