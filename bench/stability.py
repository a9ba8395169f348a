"""Loss spikes at a deliberately unstable learning rate, with and without QK-norm, z-loss and the spike guard.

The ``tiny`` preset (d=256, 4 layers, BPE 4096 on tiny-shakespeare) is trained by the one Trainer at 10x its
preset peak LR (2e-2 instead of 2e-3, short warmup), once per setting:

- ``lr_1x``: the preset LR, guard off (the reference curve);
- ``lr_10x``: 10x LR, guard off (``spike_factor=0``);
- ``+qk_norm``: ``model.qk_norm=true`` (RMSNorm on each head's queries and keys, Qwen3 form);
- ``+z_loss``: ``train.z_loss_weight=1e-4`` (PaLM's output z-loss);
- ``+guard``: the Trainer's spike guard (skip a step whose loss is > 4x the running median; roll back to the
  last checkpoint with half the LR after 3 in a row);
- ``+all``: the three together.

Every run logs each step and per-layer gradient / activation norms (``train.log_layer_norms=true``). A
*spike* is a step whose loss exceeds 1.3x the median of the previous 20 steps (a run of such steps counts
once); the layer it starts in is the block whose gradient norm at that step is largest relative to its own
median over the previous 20 steps. Same data order (seed) in every run. Loss curves go to ``--out`` as a PNG.

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/stability.py [--steps 150] [--out DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from llmlab.recipes.pretrain import build_trainer, ensure_dataset, load_pretrain_config
from llmlab.train.logging import read_metrics

SEQ = 128
SPIKE_RATIO, WINDOW = 1.3, 20

SETTINGS: dict[str, list[str]] = {
    "lr_1x": ["lr=2e-3", "min_lr=2e-4", "spike_factor=0"],
    "lr_10x": ["spike_factor=0"],
    "+qk_norm": ["spike_factor=0", "model.qk_norm=true"],
    "+z_loss": ["spike_factor=0", "z_loss_weight=1e-4"],
    "+guard": [],
    "+all": ["model.qk_norm=true", "z_loss_weight=1e-4"],
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
        "warmup_steps=10",
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
    run_dir = out / name.strip("+")
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
    spikes, first = 0, None
    in_spike = False
    for t in range(WINDOW, len(train)):
        past = [x for x in losses[t - WINDOW : t] if math.isfinite(x)]
        bad = not math.isfinite(losses[t]) or (past and losses[t] > SPIKE_RATIO * statistics.median(past))
        if bad and not in_spike:
            spikes += 1
            if first is None:
                first = {
                    "step": train[t]["step"],
                    "loss": losses[t],
                    "layer": spike_layer(train, t, n_layers),
                }
        in_spike = bool(bad)
    events = [r for r in rows if r.get("event") in ("skip_step", "rollback")]
    finite = [x for x in losses if math.isfinite(x)]
    tail = finite[-20:]
    return {
        "spikes": spikes,
        "first_spike": first,
        "skipped_steps": sum(1 for e in events if e["event"] == "skip_step"),
        "rollbacks": sum(1 for e in events if e["event"] == "rollback"),
        "guard_named_layers": sorted({e["layer"] for e in events if e.get("layer")}),
        "non_finite_losses": len(losses) - len(finite),
        "final_loss_mean_last20": sum(tail) / len(tail) if tail else float("nan"),
        "max_grad_norm": max((r["grad_norm"] for r in train if math.isfinite(r["grad_norm"])), default=None),
        "losses": losses,
    }


def spike_layer(train: list[dict], t: int, n_layers: int) -> str | None:
    best, ratio = None, 0.0
    for i in range(n_layers):
        key = f"layer{i}_grad_norm"
        past = [r[key] for r in train[t - WINDOW : t] if key in r and math.isfinite(r[key])]
        now = train[t].get(key)
        if (
            past
            and now is not None
            and math.isfinite(now)
            and now / max(statistics.median(past), 1e-12) > ratio
        ):
            best, ratio = f"layer{i}", now / max(statistics.median(past), 1e-12)
    return best


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, res in results.items():
        ax.plot(
            range(1, len(res["losses"]) + 1), res["losses"], label=f"{name} ({res['spikes']} spikes)", lw=1
        )
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_ylim(top=min(12.0, ax.get_ylim()[1]))
    ax.set_title("tiny preset at 10x LR: QK-norm, z-loss, spike guard")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-2, help="the unstable peak LR (the tiny preset's is 2e-3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset")
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
        print(f"{name}: {results[name]['spikes']} spikes, first {results[name]['first_spike']}", flush=True)
    plot(results, out / "stability_loss_curves.png")
    summary = {
        "setup": {
            "steps": args.steps,
            "tokens_per_step": args.batch * SEQ,
            "lr_unstable": args.lr,
            "seconds": seconds,
        },
        **{name: {k: v for k, v in res.items() if k != "losses"} for name, res in results.items()},
        "plot": str(out / "stability_loss_curves.png"),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
