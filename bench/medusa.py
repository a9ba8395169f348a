"""Medusa heads on SmolLM2-135M-Instruct: train them, then decode against no speculation, n-gram and a draft.

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/medusa.py [--heads-dir runs/smollm2-medusa]
        [--train key=value ...] [--prompts 4] [--tokens 48] [--chains 2,4] [--threads 2]

1. Trains Medusa heads with ``llmlab medusa``'s recipe (self-distillation on the model's own greedy answers
   to Alpaca training prompts; skipped when ``--heads-dir`` already holds heads) and prints its report.
2. Batch 1, greedy, held-out Alpaca prompts (never trained on), configurations interleaved prompt by prompt:
   the target alone, prompt lookup (n-gram, k=4), a draft model (k=4: the distilled SmolLM2 draft of
   ``llmlab distill`` when ``--draft`` exists, else -- as ``bench/decode.py`` does -- the target itself on
   the int4 fast path), Medusa chains of each length in ``--chains`` and the candidate trees of ``TREES``.
   Speedup = total time of the target alone / total time of the configuration, prefill included; acceptance
   length = tokens emitted per request per verify step. Every output must equal the target's own (asserted).
3. Batch 16 (16 held-out prompts at once, continuous batching): throughput of the target alone, n-gram,
   the draft, the best Medusa chain and the best tree (best: at batch 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmlab.distill.data import alpaca_split  # noqa: E402
from llmlab.infer import LLM, SamplingParams  # noqa: E402
from llmlab.medusa.tree import DEFAULT_TREE, build_tree  # noqa: E402
from llmlab.recipes.common import load_base  # noqa: E402
from llmlab.recipes.medusa import format_medusa_report, load_medusa_config, run_medusa  # noqa: E402
from llmlab.sft.chat import prompt_ids  # noqa: E402

# Candidate trees (Medusa "choices": top-k rank paths), the root included in the node count.
TREES = [[[0], [1], [0, 0], [0, 0, 0]], DEFAULT_TREE]
# Sized for a shared 2-core CPU: ~30k self-generated answer tokens, 300 steps of 256 positions.
TRAIN_DEFAULTS = [
    "max_examples=384",
    "response_tokens=80",
    "max_steps=300",
    "accept_prompts=0",
    "eval_examples=8",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="target (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--heads-dir", default="runs/smollm2-medusa", help="where the heads are (or go)")
    ap.add_argument("--train", nargs="*", default=[], help="extra key=value overrides for the training")
    ap.add_argument("--draft", default="runs/smollm2-draft/final", help="distilled draft, if it exists")
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts at batch 1")
    ap.add_argument("--tokens", type=int, default=48, help="max new tokens per prompt")
    ap.add_argument("--chains", default="2,4", help="Medusa chain lengths to try")
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
        cfg = load_medusa_config("smollm2-medusa", None, [f"base={args.model}", *TRAIN_DEFAULTS, *args.train])
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

    def best(kind: str) -> str:
        return max((n for n in configs if n.startswith(kind)), key=lambda n: results["batch1"][n]["speedup"])

    # ----------------------------------------------------------------------------------- batch 16
    batch = prompts[:16]
    results["batch16"] = {}
    ref16 = None
    for name in (
        "target alone",
        "n-gram, k=4",
        f"{draft_label}, k=4",
        best("Medusa chain"),
        best("Medusa tree"),
    ):
        dt, outs = run(name, batch)
        ref16 = outs if ref16 is None else ref16
        assert outs == ref16, f"{name}: batch-16 outputs differ from the target's"
        n = sum(len(o) for o in outs)
        results["batch16"][name] = {"seconds": dt, "tok_per_s": n / dt}
        report(f"batch 16: {name}", f"{n / dt:.1f} tok/s ({n} tokens, {dt:.1f} s)")
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


if __name__ == "__main__":
    sys.exit(main())
