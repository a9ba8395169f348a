"""Continual pre-training: a TinyStories model continued on Gutenberg; new-domain gain vs old-domain forgetting.

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/continual_pretrain.py \\
        --base /tmp/llmlab-runs/demo/pretrain --old-data /tmp/llmlab-runs/demo/data --steps 120

It prepares Gutenberg with the base model's own tokenizer (once), then runs ``llmlab pretrain --init-from``
four ways: re-warmed (linear warmup to the original peak LR, cosine re-decay) or not (constant at the
original run's final LR), each with and without replay of a fraction of old-domain windows. Every model,
the base included, is scored the same way (fp32, the same held-out windows) on both domains' val splits:

- gain = base new-domain loss - continued new-domain loss (higher is better);
- forgetting = continued old-domain loss - base old-domain loss (lower is better).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def held_out(model, data_dir: Path, seq_len: int, batches: int) -> float:
    from llmlab.data.loader import iterate_split
    from llmlab.train.evaluation import evaluate_loss

    return evaluate_loss(model, iterate_split(data_dir, "val", seq_len, 16, batches))["loss"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="/tmp/llmlab-runs/demo/pretrain", help="model to continue")
    parser.add_argument("--old-data", default="/tmp/llmlab-runs/demo/data", help="its original shards")
    parser.add_argument("--corpus", default="gutenberg", help="the new domain")
    parser.add_argument("--work", default="/tmp/llmlab-bench/continual", help="scratch directory")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--peak-lr", type=float, default=2e-3, help="re-warm target (the original peak)")
    parser.add_argument("--final-lr", type=float, default=1e-4, help="the original run's final LR")
    parser.add_argument("--replay", type=float, default=0.25, help="replay fraction of the replay runs")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--reuse", action="store_true", help="keep runs whose final/ exists (an interrupted bench)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llmlab.loading import load
    from llmlab.recipes.pretrain import load_pretrain_config, run_pretrain

    work = Path(args.work)
    new_data = work / f"{args.corpus}-shards"
    common = [
        f"data.dir={new_data}",
        f"data.corpus={args.corpus}",
        f"data.replay_dir={args.old_data}",
        "data.clean=none",
        f"max_steps={args.steps}",
        "batch_size=16",
        "seq_len=256",
        "eval_every=0",
        f"eval_batches={args.eval_batches}",
        "save_every=0",
        "progress=false",
        "tensorboard=false",
        "log_every=20",
    ]
    rewarm = [f"lr={args.peak_lr}", f"min_lr={args.final_lr}", "warmup_steps=20", "schedule=cosine"]
    constant = [f"lr={args.final_lr}", f"min_lr={args.final_lr}", "warmup_steps=0", "schedule=constant"]
    runs = {
        "re-warm + re-decay, no replay": rewarm + ["data.replay_fraction=0"],
        f"re-warm + re-decay, replay {args.replay:g}": rewarm + [f"data.replay_fraction={args.replay}"],
        "constant final LR, no replay": constant + ["data.replay_fraction=0"],
        f"constant final LR, replay {args.replay:g}": constant + [f"data.replay_fraction={args.replay}"],
    }

    base, _ = load(args.base)
    results = {}
    rows = []
    for name, extra in runs.items():
        out = work / name.replace(" ", "_").replace(",", "").replace("+", "")
        t0 = time.perf_counter()
        if not (args.reuse and (out / "final" / "config.json").is_file()):
            run_pretrain(load_pretrain_config("tiny", None, common + extra, init_from=args.base), out)
        seconds = time.perf_counter() - t0
        if not results:  # the new domain exists only now (prepared by the first run): score the base
            results["base"] = {
                "new": held_out(base, new_data, 256, args.eval_batches),
                "old": held_out(base, Path(args.old_data), 256, args.eval_batches),
            }
        model, _ = load(out)
        new = held_out(model, new_data, 256, args.eval_batches)
        old = held_out(model, Path(args.old_data), 256, args.eval_batches)
        results[name] = {"new": new, "old": old, "seconds": seconds}
        rows.append(name)
        print(f"[bench] {name}: new {new:.3f}, old {old:.3f} ({seconds:.0f}s)", flush=True)

    b = results["base"]
    print(
        f"\nbase {args.base}: new-domain ({args.corpus}) loss {b['new']:.3f}, old-domain loss {b['old']:.3f}"
    )
    print(f"{args.steps} steps x 16 x 256 tokens each\n")
    print("| run | new-domain loss | gain | old-domain loss | forgetting | gain / forgetting |")
    print("|---|---|---|---|---|---|")
    for name in rows:
        r = results[name]
        gain, forget = b["new"] - r["new"], r["old"] - b["old"]
        ratio = f"{gain / forget:.2f}" if forget > 1e-6 else "n/a (no forgetting)"
        print(f"| {name} | {r['new']:.3f} | {gain:+.3f} | {r['old']:.3f} | {forget:+.3f} | {ratio} |")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
