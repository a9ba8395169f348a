"""Fine-tuning cost: full vs LoRA vs QLoRA step time and peak memory, in one run.

Each mode runs in its own fresh process (so its peak RSS is its own), loads the same base, takes a few
optimizer steps of SFT through the shared :class:`~llmlab.train.Trainer` on shipped Alpaca data, and reports
the median step time, tokens/s, peak RSS and the trainable/base-weight sizes. The summary prints ratios
against full fine-tuning taken in this one run (absolute timings on a shared CPU are noisy; the ratios hold).

    .venv/bin/python bench/finetune.py                 # SmolLM2-135M-Instruct (bundled GGUF)
    .venv/bin/python bench/finetune.py --model tiny    # a random tiny model: seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = ("full", "lora", "qlora")


def worker(args: argparse.Namespace) -> dict:
    import torch

    from llmlab.model.lora import LoRAConfig, apply_lora, describe
    from llmlab.quant.qlora import quantize_for_qlora
    from llmlab.recipes.common import load_base
    from llmlab.sft.datasets import SFTBatchSource, encode_conversations, load_conversations
    from llmlab.train import TrainConfig, Trainer

    torch.manual_seed(0)
    if args.model == "tiny":
        from llmlab.model import MODEL_PRESETS, Transformer
        from llmlab.tokenizer.train import train_tokenizer

        texts = [m["content"] for c in load_conversations("alpaca", limit=500) for m in c.messages]
        tokenizer = train_tokenizer(texts, 1024)
        cfg = MODEL_PRESETS["tiny"]
        cfg.vocab_size = tokenizer.vocab_size
        model = Transformer(cfg)
    else:
        model, tokenizer = load_base(args.model)
    model = model.float()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    targets = ["all"]
    memory = {}
    if args.mode == "qlora":
        memory = quantize_for_qlora(model, targets)
    if args.mode in ("lora", "qlora"):
        apply_lora(model, LoRAConfig(r=args.rank, alpha=2 * args.rank, targets=targets))
    convs = load_conversations("alpaca", limit=400)
    examples = encode_conversations(tokenizer, convs, args.seq + 1)
    source = SFTBatchSource(examples, args.batch, args.seq, tokenizer.pad_id or 0, pack=True)
    tcfg = TrainConfig(
        lr=1e-4,
        min_lr=0.0,
        warmup_steps=0,
        max_steps=args.steps + 1,
        batch_size=args.batch,
        seq_len=args.seq,
        progress=False,
        tensorboard=False,
        plot=False,
        peak_tflops=1.0,
        precision=args.precision,
    )
    trainer = Trainer(model, tcfg, source)
    times, tokens = [], 0
    for i in range(args.steps + 1):
        batch = source.next_batch()
        t0 = time.perf_counter()
        m = trainer.train_step([batch])
        if i > 0:  # the first step pays one-off allocation costs
            times.append(time.perf_counter() - t0)
            tokens += int(m["tokens"])
    step = statistics.median(times)
    return {
        "mode": args.mode,
        "step_s": step,
        "tokens_per_s": tokens / sum(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_loaded,
        **describe(model),
        **memory,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="base: smollm2, tiny, or any path llmlab can load")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.mode = args.worker
        print(json.dumps(worker(args)))
        return 0
    results = {}
    for mode in args.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            mode,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--rank",
            str(args.rank),
            "--precision",
            args.precision,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"model={args.model} batch={args.batch}x{args.seq} steps={args.steps} rank={args.rank} {args.precision}"
    )
    print(f"{'mode':6} {'step s':>8} {'tok/s':>8} {'peak RSS MB':>12} {'trainable':>12}")
    for mode, r in results.items():
        print(
            f"{mode:6} {r['step_s']:8.3f} {r['tokens_per_s']:8.0f} {r['peak_rss_mb']:12.0f} {r['trainable']:12,}"
        )
    if "full" in results:
        full = results["full"]
        for mode, r in results.items():
            if mode != "full":
                print(
                    f"{mode} vs full: step time x{r['step_s'] / full['step_s']:.2f}, "
                    f"peak RSS x{r['peak_rss_mb'] / full['peak_rss_mb']:.2f}"
                )
    if "qlora" in results:
        q = results["qlora"]
        print(
            f"QLoRA base weights: {q['fp32_bytes'] / 2**20:.1f} MB fp32, {q['bf16_bytes'] / 2**20:.1f} MB bf16 -> "
            f"{q['nf4_bytes'] / 2**20:.1f} MB NF4 (x{q['bf16_bytes'] / q['nf4_bytes']:.2f} vs bf16, "
            f"x{q['fp32_bytes'] / q['nf4_bytes']:.2f} vs fp32)"
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
