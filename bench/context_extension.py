"""Context extension by training: per-position loss and passkey retrieval before and after.

    # the demo's TinyStories model (trained at 256 tokens) extended to 1024 on packed Gutenberg books
    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/context_extension.py tiny --steps 120

    # SmolLM2-135M-Instruct (GGUF) on the passkey test at and beyond its trained context
    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/context_extension.py smollm2 --lengths 1024,4096,8192

``tiny`` prepares Gutenberg with the base model's tokenizer in long documents (paragraph blocks of
``--chunk-chars``, so most 1025-token windows hold one book's running text), then compares on the same
held-out windows of 4x the original context:

- ``base``: the model as trained, positions past 256 extrapolated (RoPE never saw them);
- ``base + PI x4``: linear position interpolation, no training;
- ``trained at 256``: continued on the same Gutenberg tokens at its own length (a control: domain, not length);
- ``PI x4 + trained at 1024``: ``--init-from`` with ``model.max_seq_len=1024 rope_scaling.type=linear
  factor=4 original_max_seq_len=256`` and ``seq_len=1024``: the extension.

Per-position loss is bucketed in 128-token ranges; the passkey test runs at 256, 512 and 1024 tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def _scaled(model, kind: str, factor: float, original: int, max_len: int):
    """The same weights under a RoPE scaling (a fresh model whose buffers are built for it)."""
    from llmlab.model.transformer import Transformer

    cfg = copy.deepcopy(model.cfg)
    cfg.rope_scaling.type, cfg.rope_scaling.factor = kind, factor
    cfg.rope_scaling.original_max_seq_len, cfg.max_seq_len = original, max_len
    out = Transformer(cfg)
    out.load_state_dict(model.state_dict())
    return out.eval()


def _tiny(args: argparse.Namespace) -> None:
    from llmlab.data.loader import open_split
    from llmlab.eval.long_context import (
        bucket_losses,
        format_passkey_table,
        passkey_accuracy,
        per_position_loss,
    )
    from llmlab.loading import load
    from llmlab.recipes.pretrain import load_pretrain_config, run_pretrain

    work = Path(args.work)
    data = work / f"{args.corpus}-long"
    long_len = 4 * args.original
    common = [
        f"data.dir={data}",
        f"data.corpus={args.corpus}",
        "data.clean=none",
        f"data.chunk_chars={args.chunk_chars}",
        f"max_steps={args.steps}",
        "warmup_steps=20",
        f"lr={args.lr}",
        f"min_lr={args.lr / 10}",
        "eval_every=0",
        "eval_batches=4",
        "progress=false",
        "tensorboard=false",
    ]
    # Same tokens per step for both runs: 16 x 256 = 4 x 1024.
    runs = {
        "trained at 256": [f"seq_len={args.original}", "batch_size=16"],
        f"PI x4 + trained at {long_len}": [
            f"seq_len={long_len}",
            "batch_size=4",
            f"model.max_seq_len={long_len}",
            "model.rope_scaling.type=linear",
            "model.rope_scaling.factor=4",
            f"model.rope_scaling.original_max_seq_len={args.original}",
        ],
    }
    trained = {}
    for name, extra in runs.items():
        out = work / name.replace(" ", "_")
        t0 = time.perf_counter()
        if not (out / "final" / "config.json").is_file():  # an interrupted bench keeps its finished runs
            run_pretrain(load_pretrain_config("tiny", None, common + extra, init_from=args.base), out)
        trained[name] = (load(out)[0], time.perf_counter() - t0)
        print(f"[bench] {name}: {trained[name][1]:.0f}s", flush=True)

    base, tok = load(args.base)
    models = {
        "base (extrapolating past 256)": base,
        "base + PI x4, no training": _scaled(base, "linear", 4.0, args.original, long_len),
        "base + NTK x4, no training": _scaled(base, "ntk", 4.0, args.original, long_len),
        **{name: m for name, (m, _) in trained.items()},
    }
    tokens = open_split(data, "val")
    results = {}
    for name, model in models.items():
        model.eval()
        losses = per_position_loss(model, tokens, long_len, max_windows=args.windows, batch_size=4)
        buckets = bucket_losses(losses, long_len // 128)
        keys = passkey_accuracy(model, tok, [256, 512, long_len], (0.0, 0.5, 1.0), samples_per_cell=4)
        results[name] = {"buckets": buckets, "passkey": keys}
        print(f"[bench] {name}: " + " ".join(f"{b['loss']:.2f}" for b in buckets), flush=True)

    print(f"\nper-position held-out loss (nats/token) on Gutenberg val, {args.windows} windows of {long_len}")
    names = list(results)
    heads = [f"{b['start']}-{b['end']}" for b in results[names[0]]["buckets"]]
    print("| model | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{b['loss']:.2f}" for b in results[name]["buckets"]) + " |")
    for name in names:
        print(f"\npasskey accuracy, {name}:\n" + format_passkey_table(results[name]["passkey"]))
    (work / "results.json").write_text(json.dumps(results, indent=2))


def _smollm2(args: argparse.Namespace) -> None:
    from llmlab.eval.long_context import format_passkey_table, passkey_accuracy
    from llmlab.loading import load

    model, tok = load("smollm2", dtype="bf16")
    print(f"SmolLM2-135M-Instruct: max_seq_len {model.cfg.max_seq_len}, rope theta {model.cfg.rope_theta}")
    lengths = [int(x) for x in args.lengths.split(",")]
    t0 = time.perf_counter()
    rows = passkey_accuracy(model, tok, lengths, (0.0, 0.5, 1.0), samples_per_cell=args.samples)
    print(f"passkey accuracy, bf16, {args.samples} samples per cell ({time.perf_counter() - t0:.0f}s):")
    print(format_passkey_table(rows))
    if args.yarn_lengths:
        native = model.cfg.max_seq_len
        extra = [int(x) for x in args.yarn_lengths.split(",")]
        for label, m in (
            ("no scaling", model),
            ("YaRN x2", _scaled(model, "yarn", 2.0, native, 2 * native).to(torch.bfloat16)),
        ):
            rows = passkey_accuracy(m, tok, extra, (0.0, 0.5, 1.0), samples_per_cell=1)
            print(f"\npast the trained context, {label}:\n" + format_passkey_table(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("tiny", help="extend the demo model from 256 to 1024 tokens")
    p.add_argument("--base", default="/tmp/llmlab-runs/demo/pretrain")
    p.add_argument("--original", type=int, default=256)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--chunk-chars", type=int, default=60000)
    p.add_argument("--corpus", default="gutenberg", help="long documents to train and score on")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--work", default="/tmp/llmlab-bench/context")
    p = sub.add_parser("smollm2", help="passkey accuracy of SmolLM2 at and beyond its context")
    p.add_argument("--lengths", default="1024,4096,8192")
    p.add_argument("--yarn-lengths", default="", help="lengths past the native context, with/without YaRN")
    p.add_argument("--samples", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"tiny": _tiny, "smollm2": _smollm2}[args.what](args)


if __name__ == "__main__":
    main()
