"""CPU attention under ``torch.compile``: llmlab's explicit kernel vs SDPA's flash kernel, in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/attention_cpu.py [--threads 2] [--heads 6] [--head-dim 64]

For each context length (batch shrinking so every row holds the same number of tokens) it times one
layer's causal attention forward + backward in bf16, both compiled: ``CausalAttentionCPU`` (two batched
matmuls around an fp32 softmax, hand-written backward; what the model uses when compiled on a CPU up to
``EXPLICIT_ATTENTION_MAX_LEN``) and ``F.scaled_dot_product_attention(is_causal=True)``. It prints the medians,
the ratio and the attention FLOP rate (causal work counted in full, as in MFU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per batch (batch = tokens / T)")
    parser.add_argument("--lengths", default="128,256,512,1024", help="comma-separated context lengths")
    parser.add_argument("--iters", type=int, default=15)
    args = parser.parse_args(argv)

    from llmlab.model.transformer import EXPLICIT_ATTENTION_MAX_LEN, CausalAttentionCPU, causal_bias_table
    from llmlab.train.perf import retain_freed_cpu_memory

    retain_freed_cpu_memory()  # as the Trainer does: multi-MB score tensors would page-fault in every call
    if args.threads:
        torch.set_num_threads(args.threads)
    H, D = args.heads, args.head_dim
    print(
        f"causal attention fwd+bwd, one layer, bf16, compiled, {H} heads x {D}, {args.tokens} tokens per batch, "
        f"{torch.get_num_threads()} threads (llmlab uses the explicit kernel up to T={EXPLICIT_ATTENTION_MAX_LEN})"
    )
    for T in (int(x) for x in args.lengths.split(",")):
        B = max(1, args.tokens // T)
        q, k, v = (torch.randn(B, H, T, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(B, H, T, D, dtype=torch.bfloat16)
        bias = causal_bias_table(T)
        sides = {
            "explicit": torch.compile(
                lambda q, k, v, bias=bias: CausalAttentionCPU.apply(q, k, v, bias), dynamic=False
            ),
            "sdpa": torch.compile(
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), dynamic=False
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in sides}
        for fn in sides.values():  # warm up (compiles)
            for _ in range(3):
                fn(q, k, v).backward(grad)
        for _ in range(args.iters):  # interleaved, so drift on a shared machine hits both sides
            for name, fn in sides.items():
                t0 = time.perf_counter()
                fn(q, k, v).backward(grad)
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        flops = 3 * 4 * B * H * T * T * D  # QK^T and PV, forward + 2x backward
        print(
            f"  T={T:5d} B={B:3d}  explicit {1e3 * med['explicit']:7.2f} ms ({flops / med['explicit'] / 1e12:.2f} "
            f"TFLOP/s)   sdpa {1e3 * med['sdpa']:7.2f} ms   sdpa/explicit = {med['sdpa'] / med['explicit']:.2f}x"
        )


if __name__ == "__main__":
    main()
