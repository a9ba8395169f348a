"""A tiny mixture of experts against a dense model with the same active parameters, same tokens.

Three runs of the pretrain recipe (``build_trainer`` + the one Trainer) on tiny-shakespeare (BPE 4096, the
bundled corpus), same seed and data order, same steps and tokens:

- ``dense``: SwiGLU with ``d_ff = 2 * E_ff`` (what a top-2 token computes in the MoE);
- ``moe+aux``: ``ffn=moe``, 8 experts of ``E_ff``, top-2, ``aux_loss_weight=0.01``, ``router_z_loss_weight=1e-3``;
- ``moe-noaux``: the same MoE with both router losses off.

Reported per run: held-out bits per byte (the Trainer's final eval), training tokens/s, total and active
parameters, and the expert load on held-out text per layer: the busiest expert's share times E (1 = perfect
balance, E/k = 4 = every token on the same two experts), the load entropy normalized to [0, 1], and the number
of "dead" experts (under 1% of the assignments). Without the auxiliary loss nothing stops the router from
favouring the experts that happened to train first; that is the collapse the loss exists to prevent.

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/moe_vs_dense.py [--steps 160] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from llmlab.data.loader import iterate_split
from llmlab.losses.moe import expert_load
from llmlab.model.moe import active_mlp_params, total_mlp_params
from llmlab.recipes.pretrain import build_trainer, ensure_dataset, load_pretrain_config
from llmlab.train.logging import read_metrics

SEQ = 128
N_EXPERTS, TOP_K = 8, 2
MODEL = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2"]


def settings(expert_ff: int) -> dict[str, list[str]]:
    moe = ["model.ffn=moe", f"model.n_experts={N_EXPERTS}", f"model.experts_top_k={TOP_K}"]
    moe.append(f"model.moe_d_ff={expert_ff}")
    return {
        "dense": [f"model.d_ff={TOP_K * expert_ff}"],
        "moe+aux": [*moe, "model.aux_loss_weight=0.01", "model.router_z_loss_weight=0.001"],
        "moe-noaux": [*moe, "model.aux_loss_weight=0", "model.router_z_loss_weight=0"],
    }


def held_out_load(model: torch.nn.Module, data_dir: Path, batches: int) -> list[list[float]]:
    """Per layer, each expert's share of the held-out assignments (averaged over ``batches`` batches)."""
    model.eval()
    total = None
    with torch.no_grad():
        for batch in iterate_split(data_dir, "val", SEQ, 16, batches):
            model(batch["input_ids"])
            load = expert_load(model)
            total = load if total is None else total + load
    return (total / batches).tolist()


def balance(layers: list[list[float]]) -> dict[str, object]:
    out = []
    for shares in layers:
        E = len(shares)
        entropy = -sum(p * math.log(p) for p in shares if p > 0) / math.log(E)
        out.append(
            {
                "max_share_x_E": round(max(shares) * E, 2),
                "entropy": round(entropy, 3),
                "dead_experts": sum(p < 0.01 for p in shares),
                "shares": [round(p, 3) for p in shares],
            }
        )
    return {
        "mean_max_share_x_E": round(sum(layer["max_share_x_E"] for layer in out) / len(out), 2),
        "mean_entropy": round(sum(layer["entropy"] for layer in out) / len(out), 3),
        "layers": out,
    }


def run(name: str, extra: list[str], args, data_dir: Path, out: Path) -> dict[str, object]:
    overrides = [
        f"data.dir={data_dir}",
        *MODEL,
        f"max_steps={args.steps}",
        f"seq_len={SEQ}",
        f"batch_size={args.batch}",
        "lr=3e-3",
        "min_lr=3e-4",
        "warmup_steps=30",
        f"eval_every={args.steps}",
        f"eval_batches={args.eval_batches}",
        f"save_every={args.steps}",
        "log_every=10",
        "peak_tflops=1",
        "progress=false",
        "tensorboard=false",
        "plot=false",
        *extra,
    ]
    cfg = load_pretrain_config("tiny", overrides=overrides)
    trainer, _ = build_trainer(cfg, out / name)
    t0 = time.perf_counter()
    final = trainer.fit()
    seconds = time.perf_counter() - t0
    rows = read_metrics(out / name / "metrics.jsonl")
    train = [r for r in rows if r.get("split") == "train" and "tokens_per_s" in r]
    timed = train[1:] or train
    model = trainer.unwrapped
    result: dict[str, object] = {
        "val_bpb": round(final.get("val_bpb", final.get("bpb", float("nan"))), 4),
        "val_loss": round(final.get("val_loss", final.get("loss", float("nan"))), 4),
        # The first log window holds the warm-up steps (allocator, first-call overheads): left out.
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in timed) / max(len(timed), 1)),
        "seconds": round(seconds, 1),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_active": active_params(model),
        "final_train_loss": round(train[-1]["loss"], 4) if train else None,
    }
    if cfg.model.ffn == "moe":
        result["load"] = balance(held_out_load(model, data_dir, args.eval_batches))
        result["train_load_max_x_E"] = [round(r.get("moe_load_max", float("nan")), 2) for r in train[::5]]
    return result


def active_params(model: torch.nn.Module) -> int:
    """Parameters one token uses: all of them but the experts it is not routed to."""
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())
    if cfg.ffn != "moe":
        return total
    return total - cfg.n_layers * (total_mlp_params(cfg) - active_mlp_params(cfg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--expert-ff", type=int, default=128)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default="dense,moe+aux,moe-noaux", help="comma-separated subset")
    ap.add_argument("--data", default="/tmp/llmlab-bench/moe/data", help="prepared tinyshakespeare dir")
    ap.add_argument("--out", default="/tmp/llmlab-bench/moe")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg = load_pretrain_config("tiny", overrides=[f"data.dir={args.data}", "progress=false"])
    data_dir = ensure_dataset(cfg.data, progress=False)
    table = settings(args.expert_ff)
    results = {}
    for name in args.settings.split(","):
        results[name] = run(name, table[name], args, data_dir, out)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "load"}), flush=True)
    summary = {
        "setup": {
            "steps": args.steps,
            "tokens": args.steps * args.batch * SEQ,
            "model": MODEL,
            "experts": N_EXPERTS,
            "top_k": TOP_K,
            "expert_ff": args.expert_ff,
            "dense_ff": TOP_K * args.expert_ff,
        },
        **results,
    }
    if "dense" in results and "moe+aux" in results:
        dense, moe = results["dense"], results["moe+aux"]
        summary["ratios"] = {
            "moe_over_dense_tokens_per_s": round(moe["tokens_per_s"] / dense["tokens_per_s"], 3),
            "moe_minus_dense_bpb": round(moe["val_bpb"] - dense["val_bpb"], 4),
        }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
