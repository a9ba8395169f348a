"""Which PEFT method? LoRA, DoRA, IA3, prefix, prompt, bottleneck adapters and full fine-tuning, one table.

Every method runs the real SFT recipe (:func:`llmlab.recipes.sft.run_sft`: the shared Trainer, the task-suite
data, the before/after measurements) in its own fresh process, so its peak RSS is its own, under the same
step budget (steps x batch x seq_len). Per method it reports:

- trainable parameters (and % of the model);
- step time: median over the training steps after the first, from the trainer's own per-step tokens/s;
- peak RSS of the process (load, base copy and optimizer state included);
- task score: held-out SFT loss on the task suite (sensitive even after a few steps) and greedy exact match
  on held-out task prompts through the inference engine (``llmlab.LLM``, the adapter in place);
- forgetting: the rise of the general-text loss (wikitext-2 test for SmolLM2, TinyStories for the demo base).

Learning rates differ by method, as they do in practice (PEFT papers tune them per method); each is a common
default for its family, printed in the table.

    .venv/bin/python bench/peft_methods.py                        # SmolLM2-135M-Instruct, 10 steps each
    .venv/bin/python bench/peft_methods.py --steps 4 --only lora,ia3
    .venv/bin/python bench/peft_methods.py --base tiny            # a random tiny base: plumbing in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (method, SFT overrides, learning rate)
METHODS = {
    "full": ([], 5e-5),
    "lora": (["lora_r=8", "lora_alpha=16", "lora_targets=all"], 1e-3),
    "dora": (["lora_r=8", "lora_alpha=16", "lora_targets=all"], 1e-3),
    "ia3": (["ia3_targets=k,v,down"], 1e-2),
    "prefix": (["prefix_tokens=16"], 3e-3),
    "prompt": (["prompt_tokens=16"], 3e-2),
    "adapter": (["adapter_size=32", "adapter_where=attn,ffn"], 1e-3),
}


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from llmlab.recipes.sft import load_sft_config, run_sft
    from llmlab.train.logging import read_metrics

    overrides, lr = METHODS[args.method]
    base = args.base
    if base == "tiny":  # a random tiny model and a small BPE: checks the plumbing in seconds, not quality
        from llmlab.data.tasks import make_sft_examples
        from llmlab.model import ModelConfig, Transformer
        from llmlab.model.checkpoint import save_checkpoint
        from llmlab.tokenizer.train import train_tokenizer

        texts = [m["content"] for r in make_sft_examples(300, seed=0) for m in r["messages"]]
        tok = train_tokenizer(texts, 512)
        base = str(Path(args.out) / f"tiny-base-{args.method}")
        cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=256)
        torch.manual_seed(0)  # the same base for every method
        save_checkpoint(base, Transformer(cfg), tok)
    general = "wikitext2-test" if args.base in ("smollm2", "tiny") else "auto"
    cfg = load_sft_config(
        None,
        None,
        [
            f"base={base}",
            "data=tasks",
            f"peft={'none' if args.method == 'full' else args.method}",
            *overrides,
            f"lr={lr}",
            f"max_steps={args.steps}",
            f"batch_size={args.batch}",
            f"seq_len={args.seq}",
            f"max_len={args.seq}",
            "warmup_steps=1",
            "eval_every=0",
            "eval_batches=2",
            "log_every=1",
            f"task_examples={args.examples}",
            f"task_eval_per_task={args.per_task}",
            f"task_eval_before={str(args.method == 'full').lower()}",
            "max_new_tokens=16",
            f"general_corpus={general}",
            f"general_eval_tokens={args.general_tokens}",
            "train.progress=false",
            "train.plot=false",
            "train.tensorboard=false",
            "peak_tflops=1.0",
        ],
    )
    run_dir = Path(args.out) / args.method
    report = run_sft(cfg, run_dir)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_s" in r]
    tps = [r["tokens_per_s"] for r in rows[1:]] or [r["tokens_per_s"] for r in rows]
    step_ms = 1000.0 * args.batch * args.seq / statistics.median(tps) if tps else float("nan")
    return {
        "method": args.method,
        "lr": lr,
        "trainable": report["params"]["trainable"],
        "trainable_pct": report["params"]["trainable_pct"],
        "step_ms": step_ms,
        "peak_rss_mb": report["peak_rss_mb"],
        "sft_val_loss": (report["before"]["sft_val_loss"], report["after"]["sft_val_loss"]),
        "exact_match": (
            report["before"].get("tasks", {}).get("exact_match"),
            report["after"].get("tasks", {}).get("exact_match"),
        ),
        "general_loss": (report["before"]["general_loss"], report["after"]["general_loss"]),
        "forgetting_pct": report["general_loss_rise_pct"],
        "seconds": report["seconds"],
    }


def table(results: list[dict], args: argparse.Namespace) -> str:
    full = next((r for r in results if r["method"] == "full"), None)
    base_em = full["exact_match"][0] if full else None
    lines = [
        f"base {args.base}, task suite, {args.steps} steps x {args.batch} x {args.seq} tokens, "
        f"{args.threads} threads; base task exact match {base_em if base_em is None else f'{base_em:.3f}'}",
        "| method | lr | trainable params | step time (ms) | vs full | peak RSS (MB) | task SFT val loss | task exact match | general-text loss (forgetting) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{r['step_ms'] / full['step_ms']:.2f}x" if full else "-"
        b, a = r["sft_val_loss"]
        gb, ga = r["general_loss"]
        em = r["exact_match"][1]
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} ({r['trainable_pct']:.2f}%) | {r['step_ms']:.0f} | "
            f"{ratio} | {r['peak_rss_mb']:.0f} | {b:.3f} -> {a:.3f} | "
            f"{'-' if em is None else f'{em:.3f}'} | {gb:.3f} -> {ga:.3f} ({r['forgetting_pct']:+.1f}%) |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2", help="smollm2, tiny, or any checkpoint llmlab.load reads")
    p.add_argument("--only", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--examples", type=int, default=600, help="generated task-suite training examples")
    p.add_argument("--per-task", type=int, default=2, help="held-out prompts per task for exact match")
    p.add_argument("--general-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--method", help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args()
    if args.method:
        print("RESULT " + json.dumps(worker(args)))
        return
    out = args.out or tempfile.mkdtemp(prefix="peft-bench-")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    results = []
    for method in args.only.split(","):
        t0 = time.time()
        cmd = [sys.executable, __file__, "--method", method, "--out", out]
        for key in ("base", "steps", "batch", "seq", "examples", "per_task", "general_tokens", "threads"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{method}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        print(f"{method}: {time.time() - t0:.0f} s {lines[-1]}", file=sys.stderr, flush=True)
        if args.json:  # after every method: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(table(results, args))


if __name__ == "__main__":
    main()
