"""``llmlab tokenizer``: train a byte-level BPE tokenizer; encode text with one."""

from __future__ import annotations

import argparse
import json
import time

from llmlab.outputs import add_output_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    tok = subparsers.add_parser(
        "tokenizer", help="train or try a byte-level BPE tokenizer", description=__doc__
    )
    sub = tok.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on a corpus",
        description="Train a byte-level BPE tokenizer (256 byte base tokens, bos/eos/pad and ChatML markers, "
        "ChatML chat template) and save tokenizer.json + tokenizer_config.json.",
    )
    p.add_argument(
        "--corpus",
        action="append",
        required=True,
        help="bundled corpus name or .txt/.jsonl file or directory; repeat to combine corpora",
    )
    p.add_argument(
        "--vocab-size", type=int, required=True, help="vocabulary size incl. bytes and special tokens"
    )
    add_output_argument(p, "output directory (tokenizer.json)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merged pair (default 2)")
    p.add_argument("--max-token-length", type=int, default=None, help="longest token in characters")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "encode", help="show the tokens of a text", description="Encode TEXT and print its tokens."
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (or tokenizer.json)")
    p.add_argument("text", help="text to encode")
    p.add_argument("--split-special-tokens", action="store_true", help="spell special-token strings as text")
    p.set_defaults(func=_encode)


def _train(args: argparse.Namespace) -> int:
    from llmlab.data.corpora import load_corpus
    from llmlab.tokenizer.train import tokenizer_stats, train_tokenizer

    texts: list[str] = []
    for name in args.corpus:
        texts.extend(load_corpus(name))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"training on {len(texts):,} documents, {n_bytes / 1e6:.2f} MB")
    start = time.perf_counter()
    tok = train_tokenizer(
        texts,
        args.vocab_size,
        min_frequency=args.min_frequency,
        max_token_length=args.max_token_length,
        show_progress=not args.no_progress,
        length=len(texts),
    )
    elapsed = time.perf_counter() - start
    tok.save(args.out)
    stats = tokenizer_stats(tok, texts)
    specials = ", ".join(
        f"{t} {tok.token_to_id(t)}" for t in (tok.bos_token, tok.eos_token, tok.pad_token) if t
    )
    print(f"trained in {elapsed:.1f} s: vocab {tok.vocab_size:,} ({specials})")
    print(f"{stats['bytes_per_token']:.2f} bytes/token on the training text")
    print(f"wrote {args.out}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from llmlab.tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    ids = tok.encode(args.text, split_special_tokens=args.split_special_tokens)
    print(json.dumps({"ids": ids, "tokens": [tok.decode([i]) for i in ids]}, ensure_ascii=False))
    return 0
