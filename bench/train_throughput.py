"""Training throughput: llmlab's Trainer vs transformers' LlamaForCausalLM, same model, same optimizer, one run.

Three sides: llmlab eager, llmlab with ``TrainConfig.compile`` (first compile ~10-60 s, excluded by the
warmup), and transformers eager. All train the ~14M-parameter ``small-14m`` shape (d=384, 6 layers, 6 heads, vocab 8192, SwiGLU, RoPE, tied
embeddings) on batches of 8 x 256 random tokens under bf16 autocast with fused AdamW (same param groups) and
gradient clipping. Steps are interleaved in rounds (llmlab, HF, llmlab, HF, ...) and each side's median step
time is used, so load from other processes on a shared machine hits both sides alike; the ratio is the
figure to trust, absolute tokens/s move with the machine's load.

MFU = tokens/s x training FLOPs/token (``flops_per_token``: 6N + attention) / the bf16 matmul peak measured
on this machine in the same run. With ``--threads 1`` the step's process CPU time is reported too ("cpu"
columns): on a shared machine the scheduler may give a 1-thread run only part of a core, which inflates wall
time but not CPU time, so CPU-time tokens/s and MFU (against a peak also timed in CPU time) are the
load-independent figures.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_throughput.py --threads 1 [--rounds 6] [--steps 2] [--threads 2] [--no-compile] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def hf_model(cfg):
    """The transformers model of the same shape: GPT2LMHeadModel for the gpt2 arch, else LlamaForCausalLM."""
    if cfg.arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=cfg.vocab_size,
                n_positions=cfg.max_seq_len,
                n_embd=cfg.d_model,
                n_layer=cfg.n_layers,
                n_head=cfg.n_heads,
                n_inner=cfg.ffn_dim,
                activation_function="gelu_new",
                layer_norm_epsilon=cfg.norm_eps,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                tie_word_embeddings=cfg.tie_embeddings,
                attn_implementation="sdpa",
            )
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_cfg)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small-14m", help="llmlab model preset (default small-14m)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved measurement rounds")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per side per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-compile", action="store_true", help="skip the llmlab compile=True side")
    parser.add_argument("--no-hf", action="store_true", help="llmlab only")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import copy
    import dataclasses

    import torch

    from llmlab.model import MODEL_PRESETS, Transformer, flops_per_token
    from llmlab.train import TrainConfig, Trainer, build_optimizer
    from llmlab.train.perf import datasheet_peak_tflops, measure_peak_tflops

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = copy.deepcopy(MODEL_PRESETS[args.preset])
    cfg.max_seq_len = max(cfg.max_seq_len, args.seq)
    tcfg = TrainConfig(
        precision="bf16",
        batch_size=args.batch,
        seq_len=args.seq,
        lr=1e-3,
        warmup_steps=0,
        max_steps=10**6,
        progress=False,
        tensorboard=False,
        plot=False,
        peak_tflops=1.0,
        device=args.device,
    )
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    # llmlab: the real Trainer step (autocast, loss, backward, clip, fused AdamW, guard), eager and with
    # TrainConfig.compile (model + cross-entropy compiled as one graph).
    sides = {}
    for name, compiled in (("llmlab", False), ("llmlab+compile", True)):
        if compiled and args.no_compile:
            continue
        torch.manual_seed(0)
        ours = Transformer(cfg)
        trainer = Trainer(ours, dataclasses.replace(tcfg, compile=compiled), None)
        sides[name] = lambda trainer=trainer: trainer.train_step([batch()])

    # transformers: the plain loop everyone writes, with the same optimizer settings and param groups.
    if not args.no_hf:
        torch.manual_seed(0)
        theirs = hf_model(cfg).to(device).train()
        opt = build_optimizer(theirs, tcfg)

        def step_hf() -> None:
            b = batch()
            ids, labels = b["input_ids"].to(device), b["labels"].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = theirs(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        sides["transformers"] = step_hf

    for fn in sides.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu_times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                if device.type == "cuda":  # kernels run asynchronously: time to their end
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)

    peak = measure_peak_tflops(device, torch.bfloat16)
    sheet = datasheet_peak_tflops(device, torch.bfloat16)  # None on CPUs: no comparable published figure
    one_thread = device.type == "cpu" and torch.get_num_threads() == 1
    # The CPU-time figures divide by a peak timed on the same clock, so the fraction stays self-consistent.
    cpu_peak = measure_peak_tflops("cpu", torch.bfloat16, cpu_time=True) if one_thread else None
    fpt = flops_per_token(cfg, args.seq, training=True)
    tokens = args.batch * args.seq
    result = {
        "preset": args.preset,
        "params_M": round(ours.num_params() / 1e6, 2),
        "batch": [args.batch, args.seq],
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bf16_peak_tflops": round(peak, 3),
        "sides": {},
    }
    if cpu_peak is not None:
        result["bf16_peak_tflops_cpu_time"] = round(cpu_peak, 3)
    for name, ts in times.items():
        med = statistics.median(ts)
        tps = tokens / med
        result["sides"][name] = {
            "median_step_s": round(med, 4),
            "tokens_per_s": round(tps),
            "mfu": round(tps * fpt / (peak * 1e12), 4),
        }
        if sheet:
            result["sides"][name]["mfu_datasheet"] = round(tps * fpt / (sheet * 1e12), 4)
        if (
            cpu_peak is not None
        ):  # CPU time = time on the one core, whatever share of it the scheduler gave us
            cpu_tps = tokens / statistics.median(cpu_times[name])
            result["sides"][name]["cpu_tokens_per_s"] = round(cpu_tps)
            result["sides"][name]["cpu_mfu"] = round(cpu_tps * fpt / (cpu_peak * 1e12), 4)
    print(
        f"training throughput, {args.preset} ({result['params_M']}M params), batch {args.batch} x {args.seq}, "
        f"bf16 autocast, fused AdamW, {result['device']}, {result['threads']} threads; bf16 matmul peak measured {peak:.2f} TFLOP/s"
        + (f" (wall), {cpu_peak:.2f} (CPU time)" if cpu_peak is not None else "")
        + (f"; datasheet peak {sheet:.0f} TFLOP/s" if sheet else "; no datasheet peak for this device")
    )
    for name, r in result["sides"].items():
        cpu = (
            f"   | cpu {r['cpu_tokens_per_s']:>6,} tok/s  MFU {100 * r['cpu_mfu']:5.1f}%"
            if one_thread
            else ""
        )
        sheet_mfu = f"  MFU(datasheet peak) {100 * r['mfu_datasheet']:5.1f}%" if "mfu_datasheet" in r else ""
        print(
            f"  {name:<13} {r['tokens_per_s']:>8,} tok/s   step {1000 * r['median_step_s']:7.1f} ms   "
            f"MFU(measured peak) {100 * r['mfu']:5.1f}%{sheet_mfu}{cpu}"
        )
    if "transformers" in result["sides"]:
        hf = result["sides"]["transformers"]["tokens_per_s"]
        for name in [k for k in result["sides"] if k.startswith("llmlab")]:
            ratio = result["sides"][name]["tokens_per_s"] / hf
            result[f"ratio_{name}_vs_transformers"] = round(ratio, 3)
            print(f"  {name} / transformers = {ratio:.2f}x")
        print(
            f"  (medians of {args.rounds * args.steps} interleaved steps per side; transformers runs eager)"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
