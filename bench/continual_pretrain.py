"""Continual pre-training: a TinyStories model continued on Gutenberg; new-domain gain vs old-domain forgetting.

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/continual_pretrain.py \\
        --base /tmp/llmlab-runs/demo/pretrain --old-data /tmp/llmlab-runs/demo/data --steps 120

It prepares Gutenberg with the base model's own tokenizer (once), then runs ``llmlab pretrain --init-from``
four ways: re-warmed (linear warmup to the original peak LR, cosine re-decay) or not (constant at the
original run's final LR), each with and without replay of a fraction of old-domain windows. Every model,
the base included, is scored the same way (fp32, the same held-out windows) on both domains' val splits:

- gain = base new-domain loss - continued new-domain loss (higher is better);
- forgetting = continued old-domain loss - base old-domain loss (lower is better).

``--smollm2`` runs the same comparison on SmolLM2-135M-Instruct (its own tokenizer) continued on
tiny-shakespeare, with WikiText-2 as the stand-in for its old (web) domain, in full and with LoRA (the adapter
is put on the loaded model before the Trainer builds its optimizer; only A and B train)::

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/continual_pretrain.py --smollm2 --steps 20
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
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M on Shakespeare, full and LoRA")
    parser.add_argument("--runs", default="", help="--smollm2: comma-separated subset of the run keys")
    parser.add_argument("--batch", type=int, default=4, help="--smollm2: rows per step")
    parser.add_argument("--seq", type=int, default=256, help="--smollm2: tokens per row")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smollm2:
        _smollm2(args)
        return

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


# SmolLM2: peak LRs for re-warming (full: 10x below its pretraining peak; LoRA: the usual adapter LR) and
# the constant "no re-warm" LR (a tenth of the peak, as at the end of a decayed run).
SMOL_LR = {"full": (3e-4, 3e-5), "lora": (2e-3, 2e-4)}
SMOL_RUNS = {  # key: (mode, re-warm, replay)
    "full-rewarm": ("full", True, False),
    "full-rewarm-replay": ("full", True, True),
    "full-constant": ("full", False, False),
    "full-constant-replay": ("full", False, True),
    "lora-rewarm": ("lora", True, False),
    "lora-rewarm-replay": ("lora", True, True),
}


def _smollm2(args: argparse.Namespace) -> None:
    from llmlab.data.loader import META_FILE
    from llmlab.loading import load
    from llmlab.model.lora import LoRAConfig, apply_lora, describe
    from llmlab.recipes.pretrain import DataConfig, build_trainer, load_pretrain_config, prepare_corpus
    from llmlab.train.optim import build_optimizer

    work = Path(
        args.work if args.work != "/tmp/llmlab-bench/continual" else "/tmp/llmlab-bench/continual-smollm2"
    )
    new_data, old_data = work / "shakespeare-smollm2", work / "wikitext-smollm2"
    t0 = time.perf_counter()
    base, tok = load("smollm2")  # fp32 weights: the starting point every run is compared against
    print(f"[bench] loaded SmolLM2 in {time.perf_counter() - t0:.0f}s", flush=True)
    for directory, corpus in ((new_data, "tinyshakespeare"), (old_data, "wikitext2-valid")):
        if not (directory / META_FILE).is_file():  # its own tokenizer; 10% of the documents held out
            prepare_corpus(DataConfig(dir=str(directory), corpus=corpus, clean="none"), False, tok)
    seq, batches = args.seq, args.eval_batches
    # Runs of the same setup finished by an earlier invocation are kept (the bench can be split in parts).
    setup = {"steps": args.steps, "batch": args.batch, "seq": seq, "eval_batches": batches}
    saved = json.loads((work / "results.json").read_text()) if (work / "results.json").is_file() else {}
    results = saved if saved.get("setup") == setup else {"setup": setup}
    if "base" not in results:
        results["base"] = {
            "new": held_out(base, new_data, seq, batches),
            "old": held_out(base, old_data, seq, batches),
        }
    print(f"[bench] base: new {results['base']['new']:.3f}, old {results['base']['old']:.3f}", flush=True)
    del base
    common = [
        f"data.dir={new_data}",
        f"data.replay_dir={old_data}",
        f"max_steps={args.steps}",
        f"batch_size={args.batch}",
        f"seq_len={seq}",
        "eval_every=0",
        "eval_batches=1",
        "save_every=0",
        "progress=false",
        "tensorboard=false",
        "plot=false",
        "peak_tflops=1",
        "log_every=5",
    ]
    keys = args.runs.split(",") if args.runs else list(SMOL_RUNS)
    for key in keys:
        if key in results:
            continue
        mode, rewarm, replay = SMOL_RUNS[key]
        peak, low = SMOL_LR[mode]
        sched = (
            [f"lr={peak}", f"min_lr={low}", f"warmup_steps={max(args.steps // 5, 1)}", "schedule=cosine"]
            if rewarm
            else [f"lr={low}", f"min_lr={low}", "warmup_steps=0", "schedule=constant"]
        )
        extra = sched + [f"data.replay_fraction={args.replay if replay else 0}"]
        t0 = time.perf_counter()
        cfg = load_pretrain_config("tiny", None, common + extra, init_from="smollm2")
        trainer, _ = build_trainer(cfg, work / key)
        if mode == "lora":  # adapters on every linear layer; the Trainer's optimizer sees only A and B
            apply_lora(trainer.model, LoRAConfig(r=16, alpha=32, targets=["all"]))
            trainer.optimizer = build_optimizer(trainer.wrapped, trainer.cfg)
        params = describe(trainer.model)
        t1 = time.perf_counter()
        trainer.fit(save_final=lambda: None)  # scored in-process below: no 540 MB checkpoint per run
        train_s = time.perf_counter() - t1
        new = held_out(trainer.model, new_data, seq, batches)
        old = held_out(trainer.model, old_data, seq, batches)
        results[key] = {
            "new": new,
            "old": old,
            "lr": cfg.train.lr,
            "schedule": cfg.train.schedule,
            "replay": cfg.data.replay_fraction,
            "params": params,
            "train_seconds": train_s,
            "seconds_per_step": train_s / args.steps,
            "seconds": time.perf_counter() - t0,
        }
        print(f"[bench] {key}: new {new:.3f}, old {old:.3f} ({train_s / args.steps:.1f} s/step)", flush=True)
        del trainer
        (work / "results.json").write_text(json.dumps(results, indent=2))
    b = results["base"]
    print(
        f"\nSmolLM2-135M-Instruct: Shakespeare (new) {b['new']:.3f}, WikiText (old) {b['old']:.3f} nats/token"
    )
    print(f"{args.steps} steps x {args.batch} x {seq} tokens each; held-out {batches} x 16 x {seq} tokens\n")
    print("| run | LR | new-domain loss | gain | old-domain loss | forgetting | gain / forgetting | s/step |")
    print("|---|---|---|---|---|---|---|---|")
    for key in [k for k in SMOL_RUNS if k in results]:
        r = results[key]
        gain, forget = b["new"] - r["new"], r["old"] - b["old"]
        ratio = f"{gain / forget:.1f}" if forget > 1e-6 else "n/a (no forgetting)"
        lr = f"{r['schedule']} {r['lr']:g}"
        print(
            f"| {key} | {lr} | {r['new']:.3f} | {gain:+.3f} | {r['old']:.3f} | {forget:+.3f} | {ratio} "
            f"| {r['seconds_per_step']:.1f} |"
        )


if __name__ == "__main__":
    main()
