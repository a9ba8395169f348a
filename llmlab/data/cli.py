"""``llmlab data``: list the bundled corpora, clean a corpus, prepare token shards."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmlab.cliargs import add_override_arguments, overrides_from
from llmlab.outputs import add_output_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="corpora, cleaning and token shards", description=__doc__)
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("corpora", help="list the bundled corpora")
    p.set_defaults(func=_corpora)

    epilog = (
        "cleaning overrides are key=value pairs of CleanConfig, e.g. min_words=20 near_threshold=0.9 "
        "dedup_near=false (see llmlab/data/clean.py)"
    )
    p = sub.add_parser(
        "prepare",
        help="clean, split and tokenize a corpus into train.bin/val.bin",
        description="Clean a corpus, split it by document, tokenize it into uint16/uint32 token shards.",
        epilog=epilog,
    )
    _corpus_args(p, mixture=True)
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="with several --corpus: sample corpus c with weight w_c ** (1/T) (T > 1 flattens the mixture)",
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (or tokenizer.json)")
    add_output_argument(p, "output directory: train.bin, val.bin, meta.json, tokenizer/")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share held out for validation (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    p.add_argument(
        "--split-by",
        choices=["document", "source"],
        default="document",
        help="hold out random documents, or whole sources (books/files)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_prepare)

    p = sub.add_parser(
        "clean",
        help="run the cleaning pipeline and write the kept documents as JSONL",
        description="Clean a corpus (boilerplate, markup, PII, quality rules, dedup) and print the report.",
        epilog=epilog,
    )
    _corpus_args(p)
    add_output_argument(
        p, "write kept documents to this .jsonl file ({'text': ...} per line)", required=False, kind="file"
    )
    p.add_argument("--report", help="write the cleaning report to this JSON file")
    p.set_defaults(func=_clean)


def _corpus_args(p: argparse.ArgumentParser, mixture: bool = False) -> None:
    if mixture:
        p.add_argument(
            "--corpus",
            required=True,
            action="append",
            metavar="CORPUS[:WEIGHT]",
            help="bundled corpus name, or a .txt/.jsonl file or directory; repeat it with :WEIGHT for a "
            "mixture weighted by tokens (tinystories:0.7 --corpus gutenberg:0.3)",
        )
    else:
        p.add_argument(
            "--corpus", required=True, help="bundled corpus name, or a .txt/.jsonl file or directory"
        )
    p.add_argument(
        "--chunk-chars",
        type=int,
        default=None,
        help="target document size in characters where documents are paragraph blocks (default 4000)",
    )
    p.add_argument("--no-clean", action="store_true", help="skip the cleaning stage")
    p.add_argument("--clean-preset", default="default", help="cleaning preset: default, light or none")
    p.add_argument("--clean-config", help="YAML file of cleaning settings")
    add_override_arguments(p, "cleaning setting overrides key=value, e.g. min_words=20")


def _clean_config(args: argparse.Namespace):
    from llmlab.config import build_config
    from llmlab.data.clean import CLEAN_PRESETS, CleanConfig

    if args.no_clean:
        return None
    return build_config(
        CleanConfig, CLEAN_PRESETS, args.clean_preset, args.clean_config, overrides_from(args)
    )


def _chunk_chars(args: argparse.Namespace) -> int:
    from llmlab.data.corpora import DEFAULT_CHUNK_CHARS

    return DEFAULT_CHUNK_CHARS if args.chunk_chars is None else args.chunk_chars


def _corpora(args: argparse.Namespace) -> int:
    from llmlab.data.corpora import CORPORA, corpus_path

    width = max(len(n) for n in CORPORA)
    for name, info in CORPORA.items():
        size = corpus_path(name).stat().st_size
        print(f"{name.ljust(width)}  {size / 1e6:5.2f} MB  {info.licence:<16}  {info.description}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from llmlab.data.prepare import prepare_dataset

    cfg = _clean_config(args)
    if len(args.corpus) > 1 or ":" in args.corpus[0]:
        return _prepare_mixture(args, cfg)
    meta = prepare_dataset(
        args.corpus[0],
        args.tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        clean=cfg if cfg is not None else False,
        split_by=args.split_by,
        chunk_chars=_chunk_chars(args),
        progress=not args.no_progress,
    )
    report = meta.pop("cleaning_report", None)
    if report is not None:
        print(report.table())
    _print_summary(args, meta)
    return 0


def _prepare_mixture(args: argparse.Namespace, cfg) -> int:
    from llmlab.data.mixture import format_mixture, prepare_mixture

    meta = prepare_mixture(
        args.corpus,
        args.tokenizer,
        args.out,
        temperature=args.temperature,
        val_fraction=args.val_fraction,
        seed=args.seed,
        clean=cfg if cfg is not None else False,
        chunk_chars=_chunk_chars(args),
        progress=not args.no_progress,
    )
    print(format_mixture(meta["mixture"]))
    _print_summary(args, meta)
    return 0


def _print_summary(args: argparse.Namespace, meta: dict) -> None:
    for split, info in meta["splits"].items():
        print(
            f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, {info['bytes']:,} bytes "
            f"({info['bytes'] / max(1, info['tokens']):.2f} bytes/token)"
        )
    comp = meta["compression"]["val"]
    print(f"val text baselines: gzip -9 {comp['gzip-9']:.3f} bits/byte, xz -9e {comp['xz-9']:.3f} bits/byte")
    print(f"wrote {Path(args.out)} ({meta['dtype']})")


def _clean(args: argparse.Namespace) -> int:
    from llmlab.data.clean import CLEAN_PRESETS, clean_documents
    from llmlab.data.corpora import load_corpus

    cfg = _clean_config(args) or CLEAN_PRESETS["none"]
    texts = load_corpus(args.corpus, _chunk_chars(args))
    result = clean_documents(texts, cfg, progress=sys.stderr.isatty())
    print(result.report.table())
    if args.report:
        result.report.save(args.report)
    if args.out:
        from llmlab.model.checkpoint import atomic_write_file

        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for text in result.texts:
                    f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

        atomic_write_file(args.out, write)
        print(f"wrote {len(result.texts):,} documents to {args.out}")
    return 0
