"""Loss spikes at a deliberately unstable learning rate, with and without QK-norm, z-loss and the spike guard.

The ``tiny`` preset (d=256, 4 layers, BPE 4096 on tiny-shakespeare) is trained by the one Trainer at a
multiple of its preset peak LR (``--lr``, default 2e-2 = 10x; session 11 used 6e-2 = 30x), once per setting:

- ``lr_1x``: the preset LR, guard off (the reference curve);
- ``lr_10x``: the unstable ``--lr``, guard off (``spike_factor=0``);
- ``+qk_norm``: ``model.qk_norm=true`` (RMSNorm on each head's queries and keys, Qwen3 form);
- ``+z_loss``: ``train.z_loss_weight=1e-4`` (PaLM's output z-loss);
- ``+guard``: the Trainer's spike guard, tightened to 1.5x (skip a step whose loss is > 1.5x the running
  median; roll back to the last checkpoint with half the LR after 3 in a row);
- ``+guard_4x``: the guard at its default 4x (not in the default list: it only catches blow-ups);
- ``+all``: the three together.

Every run logs each step and per-layer gradient / activation norms (``train.log_layer_norms=true``). A
*spike* is a step whose loss exceeds 1.3x the median of the previous 20 steps (a run of such steps counts
once); the layer it starts in is the block whose gradient norm at that step is largest relative to its own
median over the previous 20 steps (:func:`llmlab.train.layer_stats.find_spikes` / ``trace_spike``). Same data
order (seed) in every run. Loss curves and the per-layer gradient norms go to ``--out`` as a PNG.

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/stability.py [--steps 150] [--lr 6e-2] [--warmup 10]
        [--beta2 0.95] [--precision bf16] [--out DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from llmlab.recipes.pretrain import build_trainer, ensure_dataset, load_pretrain_config
from llmlab.train.layer_stats import find_spikes, trace_spike
from llmlab.train.logging import read_metrics

SEQ = 128
SPIKE_RATIO, WINDOW, MIN_HISTORY = 1.3, 20, 5

# The spike guard tightened to this bench's own spike test (1.5x the median after 5 good steps).
GUARD = ["spike_factor=1.5", "spike_min_history=5"]
SETTINGS: dict[str, list[str]] = {
    "lr_1x": ["lr=2e-3", "min_lr=2e-4", "spike_factor=0"],
    "lr_10x": ["spike_factor=0"],
    "+qk_norm": ["spike_factor=0", "model.qk_norm=true"],
    "+z_loss": ["spike_factor=0", "z_loss_weight=1e-4"],
    "+guard": GUARD,
    "+guard_4x": [],  # the Trainer's default guard (4x the median): it only catches blow-ups
    "+all": ["model.qk_norm=true", "z_loss_weight=1e-4", *GUARD],
}


def run(name: str, extra: list[str], args, data_dir: Path, out: Path) -> list[dict]:
    overrides = [
        f"data.dir={data_dir}",
        f"max_steps={args.steps}",
        f"seq_len={SEQ}",
        f"batch_size={args.batch}",
        f"lr={args.lr}",
        f"min_lr={args.lr / 10}",
        "peak_tflops=1",  # skip the peak-matmul measurement (MFU is not reported here)
        f"warmup_steps={args.warmup}",
        f"betas=[0.9,{args.beta2}]",
        f"precision={args.precision}",
        "eval_every=0",
        f"save_every={args.steps // 4}",
        "log_every=1",
        "progress=false",
        "tensorboard=false",
        "plot=false",
        "eval_batches=4",
        "log_layer_norms=true",
        *extra,
    ]
    run_dir = out / f"{args.tag}{name.strip('+')}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and (run_dir / "final").is_dir():
        done = [r for r in read_metrics(metrics) if r.get("split") == "train"]
        if done and done[-1]["step"] == args.steps:  # finished earlier (an interrupted bench): reuse
            return read_metrics(metrics)
    cfg = load_pretrain_config("tiny", overrides=overrides)
    trainer, _ = build_trainer(cfg, run_dir)
    trainer.fit()
    return read_metrics(metrics)


def analyse(rows: list[dict]) -> dict:
    train = [r for r in rows if r.get("split") == "train"]
    losses = [r["loss"] for r in train]
    n_layers = sum(1 for k in train[0] if k.startswith("layer") and k.endswith("_grad_norm"))
    starts = find_spikes(losses, SPIKE_RATIO, WINDOW, MIN_HISTORY)
    traces = [{"step": train[t]["step"], "loss": losses[t], **trace_spike(train, t, WINDOW)} for t in starts]
    events = [r for r in rows if r.get("event") in ("skip_step", "rollback")]
    finite = [x for x in losses if math.isfinite(x)]
    tail = finite[-20:]
    return {
        "spikes": len(starts),
        "spike_steps": [train[t]["step"] for t in starts],
        "spike_layers": [tr["layer"] for tr in traces],
        "spike_act_layers": [tr["act_layer"] for tr in traces],
        "first_spike": traces[0] if traces else None,
        "skipped_steps": sum(1 for e in events if e["event"] == "skip_step"),
        "rollbacks": sum(1 for e in events if e["event"] == "rollback"),
        "guard_named_layers": sorted({e["layer"] for e in events if e.get("layer")}),
        "non_finite_losses": len(losses) - len(finite),
        "final_loss": finite[-1] if finite else float("nan"),
        "final_loss_mean_last20": sum(tail) / len(tail) if tail else float("nan"),
        "max_grad_norm": max((r["grad_norm"] for r in train if math.isfinite(r["grad_norm"])), default=None),
        "losses": losses,
        "layer_grad_norms": {
            f"layer{i}": [r.get(f"layer{i}_grad_norm", float("nan")) for r in train] for i in range(n_layers)
        },
        "layer_act_rms": {
            f"layer{i}": [r.get(f"layer{i}_act_rms", float("nan")) for r in train] for i in range(n_layers)
        },
    }


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 8))
    for name, res in results.items():
        ax.plot(
            range(1, len(res["losses"]) + 1), res["losses"], label=f"{name} ({res['spikes']} spikes)", lw=1
        )
    ax.set_ylabel("train loss")
    ax.set_ylim(top=min(12.0, ax.get_ylim()[1]))
    ax.set_title(title)
    ax.legend()
    # The per-layer gradient norms of the first setting with spikes: which block moves at each spike.
    traced = next((n for n, r in results.items() if r["spikes"]), next(iter(results)))
    shown = 60  # the first steps, where the spikes are
    for i, (layer, rms) in enumerate(results[traced]["layer_act_rms"].items()):
        grads = results[traced]["layer_grad_norms"][layer]
        ax2.plot(range(1, shown + 1), rms[:shown], color=f"C{i}", lw=1.2, label=f"{layer} output RMS")
        ax2.plot(
            range(1, shown + 1), grads[:shown], color=f"C{i}", lw=0.8, ls=":", label=f"{layer} grad norm"
        )
    for step in results[traced]["spike_steps"]:
        ax2.axvline(step, color="grey", lw=0.5, ls="--")
    ax2.set_yscale("log")
    ax2.set_xlabel(f"step (lower panel: the first {shown})")
    ax2.set_ylabel(f"per-layer norms ({traced})")
    ax2.legend(ncol=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-2, help="the unstable peak LR (the tiny preset's is 2e-3)")
    ap.add_argument("--warmup", type=int, default=10, help="warmup steps (0: the full LR from step 1)")
    ap.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (0.99+: slower second moments)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--tag", default="", help="prefix of the run directories (several sweeps in one --out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--settings", default=",".join(k for k in SETTINGS if k != "+guard_4x"), help="comma-separated subset"
    )
    ap.add_argument(
        "--data", default="/tmp/llmlab-bench/clm_vs_mlm/data", help="prepared tinyshakespeare dir"
    )
    ap.add_argument("--out", default="/tmp/llmlab-bench/stability")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg = load_pretrain_config("tiny", overrides=[f"data.dir={args.data}", "progress=false"])
    data_dir = ensure_dataset(cfg.data, progress=False)
    results, seconds = {}, {}
    for name in args.settings.split(","):
        t0 = time.perf_counter()
        results[name] = analyse(run(name, SETTINGS[name], args, data_dir, out))
        seconds[name] = round(time.perf_counter() - t0, 1)
        res = results[name]
        print(
            f"{name}: {res['spikes']} spikes at {res['spike_steps']}, final {res['final_loss']:.3f}, "
            f"first {res['first_spike']}",
            flush=True,
        )
    png = out / f"{args.tag}stability_loss_curves.png"
    title = f"tiny preset, peak LR {args.lr:g}, warmup {args.warmup}, beta2 {args.beta2}, {args.precision}"
    plot(results, png, title)
    summary = {
        "setup": {
            "steps": args.steps,
            "tokens_per_step": args.batch * SEQ,
            "lr_unstable": args.lr,
            "warmup": args.warmup,
            "beta2": args.beta2,
            "precision": args.precision,
            "seconds": seconds,
        },
        **{
            name: {k: v for k, v in res.items() if k not in ("losses", "layer_grad_norms", "layer_act_rms")}
            for name, res in results.items()
        },
        "plot": str(png),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
