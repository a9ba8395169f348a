"""Context extension by training: per-position loss and passkey retrieval before and after.

    # the demo's TinyStories model (trained at 256 tokens) extended to 1024 on packed Gutenberg books
    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/context_extension.py tiny --steps 120

    # SmolLM2-135M-Instruct (GGUF) on the passkey test at and beyond its trained context (8,192), the latter
    # without and with inference-time YaRN / NTK scaling, and the cost of one training step at long contexts
    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/context_extension.py smollm2 --lengths 2048,4096,8192 \
        --beyond 16384 --scalings none,yarn,ntk --step-lengths 2048,4096

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


def _train_step_cost(model, length: int) -> dict[str, float]:
    """Seconds and peak-RSS growth of one bf16-autocast forward + backward of one ``length``-token row."""
    import resource

    from llmlab.losses.lm import causal_lm_loss

    ids = torch.randint(0, model.cfg.vocab_size, (1, length + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    model.train()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_lm_loss(model, batch)
    (out.loss_sum / out.weight).backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    model.eval()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"length": length, "seconds": seconds, "peak_rss_gib": rss, "rss_growth_gib": rss - rss0}


def _smollm2(args: argparse.Namespace) -> None:
    from llmlab.eval.long_context import format_passkey_table, passkey_accuracy
    from llmlab.infer.options import apply_rope_scaling
    from llmlab.loading import load

    depths = tuple(float(x) for x in args.depths.split(","))
    results: dict = {"depths": depths, "passkey": {}, "train_step": []}
    out = Path(args.json) if args.json else None
    if args.step_lengths:  # what training at a longer context would cost here (fp32 weights, bf16 autocast)
        fp32, _ = load("smollm2")
        for length in (int(x) for x in args.step_lengths.split(",")):
            cost = _train_step_cost(fp32, length)
            results["train_step"].append(cost)
            print(
                f"train step, 1 x {length} tokens: {cost['seconds']:.1f}s, peak RSS {cost['peak_rss_gib']:.1f} GiB",
                flush=True,
            )
        del fp32
    model, tok = load("smollm2", dtype="bf16")
    native = results["native"] = model.cfg.max_seq_len
    print(f"SmolLM2-135M-Instruct: max_seq_len {native}, rope theta {model.cfg.rope_theta}", flush=True)

    def score(label: str, m, lengths: list[int], samples: int, at=depths) -> None:
        t0 = time.perf_counter()
        rows = passkey_accuracy(m, tok, lengths, at, samples_per_cell=samples)
        seconds = time.perf_counter() - t0
        results["passkey"].setdefault(label, []).extend(rows)
        print(f"\npasskey, {label}, bf16, {samples} sample(s) per cell ({seconds:.0f}s):", flush=True)
        print(format_passkey_table(rows), flush=True)
        if out:
            out.write_text(json.dumps(results, indent=2))

    if args.lengths:
        score("no scaling", model, [int(x) for x in args.lengths.split(",")], args.samples)
    beyond = [int(x) for x in args.beyond.split(",")] if args.beyond else []
    beyond_depths = tuple(float(x) for x in args.beyond_depths.split(",")) if args.beyond_depths else depths
    for kind in args.scalings.split(",") if beyond else []:
        factor = max(beyond) / native
        if kind == "none":
            score("no scaling", model, beyond, args.beyond_samples, beyond_depths)
            continue
        # the engine's inference-time switch (llmlab.LLM(rope_scaling=...)): same weights, new RoPE tables
        apply_rope_scaling(model, {"type": kind, "factor": factor, "original_max_seq_len": native})
        score(f"{kind} x{factor:g}", model, beyond, args.beyond_samples, beyond_depths)
        if args.scaled_native:  # the price of the scaling inside the trained context
            score(f"{kind} x{factor:g}", model, [int(x) for x in args.scaled_native.split(",")], 1)
        apply_rope_scaling(model, {"type": "none"})
    if out:
        out.write_text(json.dumps(results, indent=2))


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
    p.add_argument("--lengths", default="2048,4096,8192", help="lengths inside the trained context")
    p.add_argument("--depths", default="0,0.5,1")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--beyond", default="", help="lengths past the trained context, e.g. 16384")
    p.add_argument("--beyond-samples", type=int, default=1)
    p.add_argument("--beyond-depths", default="", help="depths for --beyond (default: --depths)")
    p.add_argument("--scalings", default="none,yarn,ntk", help="inference-time RoPE scalings for --beyond")
    p.add_argument("--scaled-native", default="", help="also score the scaled models at these lengths")
    p.add_argument("--step-lengths", default="", help="measure one training step at these lengths")
    p.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"tiny": _tiny, "smollm2": _smollm2}[args.what](args)


if __name__ == "__main__":
    main()
