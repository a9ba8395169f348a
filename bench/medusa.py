"""Medusa heads on SmolLM2-135M-Instruct: train them, then decode against no speculation, n-gram and a draft.

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/medusa.py [--heads-dir runs/smollm2-medusa]
        [--train key=value ...] [--prompts 4] [--tokens 48] [--chains 1,2,4] [--threads 2] [--train-only]

1. Trains Medusa heads with ``llmlab medusa``'s recipe (self-distillation on the model's own greedy answers
   to Alpaca training prompts, answers and hidden states cached in ``--cache-dir``; skipped when
   ``--heads-dir`` already holds heads) and prints its report with the held-out curve.
2. Step cost: median milliseconds of one engine step at batch 1 for a plain decode step, and for Medusa
   chains of 1 and 4 and the 10-node tree with the heads' rows fused into the verify forward's LM-head
   matmul and without (a second LM-head read for the heads); and the LM-head matmul alone at those row
   counts.
3. Batch 1, greedy, held-out Alpaca prompts (never trained on), configurations interleaved prompt by prompt:
   the target alone, prompt lookup (n-gram, k=4), a draft model (k=4: the distilled SmolLM2 draft of
   ``llmlab distill`` when ``--draft`` exists, else -- as ``bench/decode.py`` does -- the target itself on
   the int4 fast path), Medusa chains of each length in ``--chains`` and the candidate trees of ``TREES``.
   Speedup = total time of the target alone / total time of the configuration, prefill included; acceptance
   length = tokens emitted per request per verify step. Every output must equal the target's own (asserted).
4. Batch 16 (16 held-out prompts at once, continuous batching): throughput and acceptance length of every
   configuration of step 3.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmlab.distill.data import alpaca_split  # noqa: E402
from llmlab.infer import LLM, SamplingParams  # noqa: E402
from llmlab.medusa.tree import DEFAULT_TREE, build_tree  # noqa: E402
from llmlab.recipes.common import load_base  # noqa: E402
from llmlab.recipes.medusa import format_medusa_report, load_medusa_config, run_medusa  # noqa: E402
from llmlab.sft.chat import prompt_ids  # noqa: E402

# Candidate trees (Medusa "choices": top-k rank paths), the root included in the node count.
TREES = [[[0], [1], [0, 0], [0, 0, 0]], DEFAULT_TREE]
# Sized for a shared 2-core CPU: ~50k self-generated answer tokens, 6000 steps of 256 positions (minutes on
# the cached hidden states), held-out scores every 1000 steps.
TRAIN_DEFAULTS = [
    "max_examples=640",
    "response_tokens=80",
    "max_steps=6000",
    "warmup_steps=100",
    "eval_every=1000",
    "log_every=500",
    "accept_prompts=0",
    "eval_examples=24",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="target (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--heads-dir", default="runs/smollm2-medusa", help="where the heads are (or go)")
    ap.add_argument("--train", nargs="*", default=[], help="extra key=value overrides for the training")
    ap.add_argument("--draft", default="runs/smollm2-draft/final", help="distilled draft, if it exists")
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts at batch 1")
    ap.add_argument("--tokens", type=int, default=48, help="max new tokens per prompt")
    ap.add_argument("--chains", default="1,2,4", help="Medusa chain lengths to try")
    ap.add_argument("--cache-dir", default="runs/smollm2-medusa-cache", help="answers + hidden states cache")
    ap.add_argument("--train-only", action="store_true", help="stop after training the heads")
    ap.add_argument("--step-tokens", type=int, default=40, help="tokens per step-cost measurement (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[tuple[str, str]] = []
    results: dict = {}

    def report(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name:<62} {value}", flush=True)

    heads_dir = Path(args.heads_dir)
    t0 = time.time()
    if not (heads_dir / "medusa_heads.safetensors").is_file():
        extra = [f"base={args.model}", f"cache_dir={args.cache_dir}", *TRAIN_DEFAULTS, *args.train]
        cfg = load_medusa_config("smollm2-medusa", None, extra)
        train_report = run_medusa(cfg, heads_dir)
    else:
        train_report = json.loads((heads_dir / "medusa_report.json").read_text())
    print(format_medusa_report(train_report), flush=True)
    results["training"] = train_report
    report("head training, whole run (generation, hidden states, steps)", f"{train_report['seconds']:.0f} s")
    report(
        "held-out greedy chain acceptance length (after training)",
        f"{train_report['after']['accept_len']:.2f}",
    )
    if args.train_only:
        return 0

    target, tok = load_base(args.model)
    target = target.float().eval()
    _, held = alpaca_split(100)
    prompts = [prompt_ids(tok, c.messages[:-1]) for c in held[16:]]
    prompts = [p for p in prompts if len(p) < target.cfg.max_seq_len // 2][: max(16, args.prompts)]
    llm = LLM.from_model(target, tok, max_batch_size=16)
    draft_path = Path(args.draft)
    if draft_path.is_dir():
        draft, draft_label = draft_path, "distilled draft"
    else:
        draft = LLM.from_model(target, tok, fast="int4", max_batch_size=16)
        draft_label = "int4 self-draft (no distilled SmolLM2 draft on disk)"
    chains = [int(c) for c in args.chains.split(",")]
    configs: dict[str, object] = {
        "target alone": None,
        "n-gram, k=4": {"method": "ngram", "num_tokens": 4},
        f"{draft_label}, k=4": {"method": "draft", "draft_model": draft, "num_tokens": 4},
    }
    for c in chains:
        configs[f"Medusa chain of {c}"] = {"method": "medusa", "heads": str(heads_dir), "num_tokens": c}
    for tree in TREES:
        n = len(build_tree(tree, 4).paths)
        configs[f"Medusa tree of {n} nodes"] = {"method": "medusa", "heads": str(heads_dir), "tree": tree}
    decoders = {name: (llm.speculative_decoder(spec) if spec else None) for name, spec in configs.items()}
    sp = SamplingParams(max_tokens=args.tokens)
    if args.step_tokens:
        results["step_cost"] = step_costs(llm, configs, prompts[0], args.step_tokens, report)

    def run(name: str, batch: list[list[int]]) -> tuple[float, list[list[int]]]:
        llm.speculative = decoders[name]
        t = time.perf_counter()
        outs = llm.generate(batch, sp)
        return time.perf_counter() - t, [o.token_ids for o in outs]

    for name in configs:  # warm-up: every verify shape runs once
        run(name, [prompts[0][:40]])
        if decoders[name] is not None:
            decoders[name].stats = dict.fromkeys(decoders[name].stats, 0)

    # ------------------------------------------------------------------------------------ batch 1
    times = dict.fromkeys(configs, 0.0)
    tokens = dict.fromkeys(configs, 0)
    reference: list[list[int]] = []
    for p in prompts[: args.prompts]:
        for name in configs:
            dt, (out,) = run(name, [p])
            times[name] += dt
            tokens[name] += len(out)
            if name == "target alone":
                reference.append(out)
            assert out == reference[-1], f"{name}: output differs from the target's"
    base = times["target alone"]
    results["batch1"] = {}
    for name in configs:
        dec = decoders[name]
        alen = dec.mean_accepted_len if dec else 1.0
        rate = dec.acceptance_rate if dec else 0.0
        results["batch1"][name] = {"seconds": times[name], "speedup": base / times[name], "accept_len": alen}
        report(f"batch 1: {name}", f"{base / times[name]:.2f}x, acceptance length {alen:.2f}, "
               f"acceptance {rate:.2f}, {tokens[name] / times[name]:.1f} tok/s")  # fmt: skip

    # ----------------------------------------------------------------------------------- batch 16
    batch = prompts[:16]
    results["batch16"] = {}
    ref16 = None
    llm.speculative = None
    llm.generate(batch, SamplingParams(max_tokens=4))  # warm-up at this batch shape
    for name in configs:
        dec = decoders[name]
        if dec is not None:
            dec.stats = dict.fromkeys(dec.stats, 0)
        dt, outs = run(name, batch)
        ref16 = outs if ref16 is None else ref16
        assert outs == ref16, f"{name}: batch-16 outputs differ from the target's"
        n = sum(len(o) for o in outs)
        alen = dec.mean_accepted_len if dec else 1.0
        results["batch16"][name] = {"seconds": dt, "tok_per_s": n / dt, "accept_len": alen}
        report(
            f"batch 16: {name}", f"{n / dt:.1f} tok/s ({n} tokens, {dt:.1f} s), acceptance length {alen:.2f}"
        )
    t16 = results["batch16"]
    for name in list(t16)[1:]:
        ratio = t16[name]["tok_per_s"] / t16["target alone"]["tok_per_s"]
        report(f"batch 16: {name} / target alone", f"{ratio:.2f}x")
    report("whole benchmark", f"{time.time() - t0:.0f} s")

    print("\n| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def step_costs(llm: LLM, configs: dict, prompt: list[int], tokens: int, report) -> dict:
    """Median ms per engine step at batch 1 (prefill and the first, draft-less step left out): a plain
    decode step, and Medusa chains of 1 and 4 and the 10-node tree, fused and unfused; then the LM-head
    matmul alone at the row counts those steps use."""
    out: dict[str, dict] = {}
    sp = SamplingParams(max_tokens=tokens, ignore_eos=True)
    heads = next(spec["heads"] for spec in configs.values() if spec and spec.get("method") == "medusa")
    cases: list[tuple[str, object, int]] = [("plain decode step", None, 0)]
    for label, spec in (
        ("Medusa chain of 1", {"method": "medusa", "heads": heads, "num_tokens": 1}),
        ("Medusa chain of 4", {"method": "medusa", "heads": heads, "num_tokens": 4}),
        ("Medusa tree of 10 nodes", {"method": "medusa", "heads": heads, "tree": DEFAULT_TREE}),
    ):
        cases += [(f"{label}, unfused (second LM-head read)", spec, 0), (f"{label}, fused", spec, 10**6)]
    for name, spec, max_rows in cases:
        dec = llm.speculative_decoder(spec) if spec else None
        if dec is not None:
            dec.medusa.max_rows = max_rows
        llm.speculative = dec
        llm.generate([prompt[:40]], SamplingParams(max_tokens=6))  # warm-up
        llm.add_request(prompt, sp)
        times = []
        while llm.has_unfinished():
            t = time.perf_counter()
            llm.step()
            times.append(time.perf_counter() - t)
        ms = 1e3 * statistics.median(times[2:])
        per_step = dec.mean_accepted_len if dec else 1.0
        out[name] = {"ms_per_step": ms, "tokens_per_step": per_step}
        report(f"step cost: {name}", f"{ms:.1f} ms/step, {per_step:.2f} tokens/step")
    llm.speculative = None
    model = llm.runner.model
    W = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight
    with torch.inference_mode():
        for rows in (1, 2, 3, 4, 5, 9, 16, 25, 48, 64):
            x = torch.randn(rows, W.shape[1])
            ms = _median_ms(lambda x=x: F.linear(x, W))
            out[f"lm_head_{rows}_rows"] = {"ms": ms}
            report(f"LM-head matmul alone, {rows} rows", f"{ms:.1f} ms")
        for T in (1, 2, 3, 4, 5, 10):  # the body's linears see T rows, as in a verify of T tokens
            ids = torch.tensor([prompt[:T]])
            ms = _median_ms(lambda ids=ids: model(ids, return_hidden=True), n=7)
            out[f"body_{T}_tokens"] = {"ms": ms}
            report(f"body forward (no cache, no LM head), {T} tokens", f"{ms:.1f} ms")
    return out


def _median_ms(fn, n: int = 15) -> float:
    fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return 1e3 * statistics.median(samples)


if __name__ == "__main__":
    sys.exit(main())
