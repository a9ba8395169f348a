"""Why decoder-only LLMs use CLM: a causal-LM and a masked-LM model, same data, same compute, one run.

Both are the ``tiny`` preset shape (d=256, 4 layers, BPE 4096 on tiny-shakespeare) trained by ``llmlab
pretrain`` machinery (``build_trainer`` + the one Trainer) for the same steps on the same token windows; the
only difference is ``objective=clm`` vs ``objective=mlm`` (bidirectional attention, 15% BERT masking).
Then, on held-out text:

1. **masked-token accuracy** (15% 80/10/10 masking, fixed seed): the MLM sees both sides of the corrupted
   sequence; the CLM predicts the same positions from the clean left context (what it can see);
2. **pseudo-perplexity** (Salazar et al. 2020: mask each token alone, ``exp(-mean log p(x_i | x_\\i))``) for
   the MLM, next to the CLM's ordinary perplexity ``exp(-mean log p(x_i | x_<i))``;
3. **left-to-right generation**: next-token accuracy/perplexity when the right context does not exist yet
   (MLM: prefix + one trailing ``[MASK]``), and greedy 48-token continuations of 32-token prompts scored by
   match with the real continuation, distinct bigrams and the CLM's NLL of the text (a biased judge: noted);
4. **cloze probe** (bidirectional context helps): pick the real word among 8 (7 distractors drawn from the
   held-out word-start tokens by frequency) at the middle of a 128-token window: MLM ``p(c | both sides)``,
   CLM left-only ``p(c | left)``, and CLM full-sequence scoring ``sum_j log p(x_j | x_<j)`` with ``c``
   inserted (uses the right context, at 8 forward passes per item).

The MLM runs its generation with the same cache-less greedy loop as the CLM here because the engine
(:class:`llmlab.LLM`) refuses a ``causal=false`` model by design.

    flock /tmp/llmlab-heavy.lock .venv/bin/python bench/clm_vs_mlm.py [--steps 400] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmlab.data.loader import iterate_split
from llmlab.losses.mlm import mask_tokens
from llmlab.model.checkpoint import load_checkpoint, read_config
from llmlab.recipes.pretrain import build_trainer, ensure_dataset, load_pretrain_config
from llmlab.train.logging import read_metrics

SEQ = 128


def train(objective: str, args, data_dir: Path, out: Path):
    overrides = [
        f"data.dir={data_dir}",
        f"objective={objective}",
        f"max_steps={args.steps}",
        f"seq_len={SEQ}",
        f"batch_size={args.batch}",
        "warmup_steps=30",
        "eval_every=0",
        "save_every=0",
        "log_every=25",
        "progress=false",
        "tensorboard=false",
        "plot=false",
        "eval_batches=8",
        "peak_tflops=1",  # skip the peak-matmul measurement (MFU is not reported here)
    ]
    run_dir = out / objective
    final = run_dir / "final"
    if not args.retrain and final.is_dir() and read_config(final).get("step") == args.steps:
        # A finished run of the same length (an earlier, interrupted bench): evaluate it, don't retrain.
        model, tok = load_checkpoint(final)
        rows = read_metrics(run_dir / "metrics.jsonl")
        metrics = {
            f"val_{k}": v for k, v in rows_last(rows, "val").items() if k not in ("step", "split", "time")
        }
    else:
        cfg = load_pretrain_config("tiny", overrides=overrides)
        trainer, _ = build_trainer(cfg, run_dir)
        metrics = trainer.fit()
        model, tok = trainer.unwrapped, trainer.tokenizer
        rows = read_metrics(run_dir / "metrics.jsonl")
    speeds = [r["tokens_per_s"] for r in rows if r.get("split") == "train" and "tokens_per_s" in r]
    print(f"[bench] {objective}: {args.steps} steps, val {metrics.get('val_loss')}", flush=True)
    return model.float().eval(), tok, metrics, sorted(speeds)[len(speeds) // 2] if speeds else None


def rows_last(rows: list[dict], split: str) -> dict:
    picked = [r for r in rows if r.get("split") == split]
    return picked[-1] if picked else {}


def held_out(data_dir: Path, n: int) -> torch.Tensor:
    rows = [b["input_ids"] for b in iterate_split(data_dir, "val", SEQ, 16, max_batches=(n + 15) // 16)]
    return torch.cat(rows)[:n]


@torch.no_grad()
def masked_accuracy(clm, mlm, ids, mask_id, vocab) -> dict:
    corrupted, labels = mask_tokens(ids, mask_id, vocab, 0.15, torch.Generator().manual_seed(123))
    labels[:, 0] = -100  # the CLM has no left context for position 0
    sel = labels != -100
    mlm_logits = mlm(corrupted)[sel].float()
    clm_logits = clm(ids)[:, :-1][sel[:, 1:]].float()  # logits at i-1 predict x_i
    target = ids[sel]
    only_mask = torch.where(sel, mask_id, ids)  # every selected position [MASK]ed: no copy-the-input help
    mlm_only_mask = mlm(only_mask)[sel].float()
    return {
        "positions": int(sel.sum()),
        "mlm_acc": float((mlm_logits.argmax(-1) == target).float().mean()),
        "mlm_acc_all_masked": float((mlm_only_mask.argmax(-1) == target).float().mean()),
        "clm_left_acc": float((clm_logits.argmax(-1) == target).float().mean()),
        "mlm_nll": float(F.cross_entropy(mlm_logits, target)),
        "clm_left_nll": float(F.cross_entropy(clm_logits, target)),
    }


@torch.no_grad()
def pseudo_perplexity(clm, mlm, ids, mask_id, chunk: int = 64) -> dict:
    """MLM: each position masked alone (T forwards per sequence, batched); CLM: ordinary perplexity."""
    nll, count = 0.0, 0
    T = ids.shape[1]
    eye = torch.eye(T, dtype=torch.bool)
    for row in ids:
        copies = row.expand(T, T).clone()
        copies[eye] = mask_id
        for s in range(0, T, chunk):
            logits = mlm(copies[s : s + chunk]).float()
            picked = logits[torch.arange(logits.shape[0]), torch.arange(s, s + logits.shape[0])]
            nll += float(F.cross_entropy(picked, row[s : s + chunk], reduction="sum"))
            count += logits.shape[0]
    logits = clm(ids).float()
    clm_nll = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
    return {"mlm_pppl": math.exp(nll / count), "clm_ppl": math.exp(clm_nll)}


@torch.no_grad()
def next_token(clm, mlm, ids, mask_id) -> dict:
    """Predict x_i from x_<i only, at prefix lengths 16, 24, ..., 120."""
    hits = {"clm": 0, "mlm": 0}
    nll = {"clm": 0.0, "mlm": 0.0}
    n = 0
    clm_logits = clm(ids).float()
    for i in range(16, SEQ, 8):
        target = ids[:, i]
        trailing = torch.cat([ids[:, :i], torch.full_like(ids[:, :1], mask_id)], dim=1)
        m = mlm(trailing)[:, -1].float()
        c = clm_logits[:, i - 1]
        for name, logits in (("clm", c), ("mlm", m)):
            hits[name] += int((logits.argmax(-1) == target).sum())
            nll[name] += float(F.cross_entropy(logits, target, reduction="sum"))
        n += len(target)
    return {
        "positions": n,
        **{f"{k}_acc": hits[k] / n for k in hits},
        **{f"{k}_ppl": math.exp(nll[k] / n) for k in nll},
    }


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, steps: int, mask_id: int | None) -> torch.Tensor:
    seq = prompt.clone()
    for _ in range(steps):
        inp = seq if mask_id is None else torch.cat([seq, torch.full_like(seq[:, :1], mask_id)], 1)
        logits = model(inp)[:, -1].float()
        if mask_id is not None:
            logits[:, mask_id] = float("-inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.shape[1] :]


def distinct2(rows: torch.Tensor) -> float:
    bigrams = [(int(a), int(b)) for r in rows for a, b in zip(r[:-1], r[1:])]
    return len(set(bigrams)) / max(len(bigrams), 1)


@torch.no_grad()
def generation(clm, mlm, ids, mask_id, tok, prompt_len=32, steps=48) -> dict:
    prompts, reference = ids[:, :prompt_len], ids[:, prompt_len : prompt_len + steps]
    out = {}
    samples = {}
    for name, model, mid in (("clm", clm, None), ("mlm", mlm, mask_id)):
        cont = greedy(model, prompts, steps, mid)
        full = torch.cat([prompts, cont], 1)
        logits = clm(full).float()[:, prompt_len - 1 : -1]
        judge = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), cont.reshape(-1)))
        out[name] = {
            "match_reference": float((cont == reference).float().mean()),
            "distinct2": distinct2(cont),
            "clm_judge_nll": judge,
        }
        samples[name] = tok.decode(cont[0].tolist()) if tok is not None else cont[0].tolist()
    samples["prompt"] = tok.decode(prompts[0].tolist()) if tok is not None else prompts[0].tolist()
    out["samples"] = samples
    return out


@torch.no_grad()
def cloze(clm, mlm, ids, mask_id, tok, k: int = 8) -> dict:
    """Multiple-choice fill-in of a word-start token at the middle of each window."""
    words = [i for i in range(tok.vocab_size) if (tok.id_to_token(i) or "").startswith("Ġ")]
    is_word = torch.zeros(tok.vocab_size + 1, dtype=torch.bool)
    is_word[words] = True
    counts = torch.bincount(ids.flatten(), minlength=len(is_word))[: len(is_word)].float() * is_word
    gen = torch.Generator().manual_seed(7)
    hits = {"mlm": 0, "clm_left": 0, "clm_full": 0}
    n = 0
    for row in ids:
        spots = [i for i in range(SEQ // 2 - 8, SEQ // 2 + 8) if is_word[row[i]]]
        if not spots:
            continue
        i = spots[0]
        weights = counts.clone()
        weights[row[i]] = 0
        distractors = torch.multinomial(weights, k - 1, generator=gen)
        cands = torch.cat([row[i : i + 1], distractors])  # the real word is candidate 0
        masked = row.clone()
        masked[i] = mask_id
        scores = {
            "mlm": mlm(masked[None])[0, i].float().log_softmax(-1)[cands],
            "clm_left": clm(row[None, :i])[0, -1].float().log_softmax(-1)[cands],
        }
        filled = row.expand(k, SEQ).clone()
        filled[:, i] = cands
        logp = clm(filled).float().log_softmax(-1)[:, :-1]
        per_token = logp.gather(-1, filled[:, 1:, None]).squeeze(-1)
        scores["clm_full"] = per_token[:, i - 1 :].sum(-1)  # the choice and every token after it
        for name, s in scores.items():
            hits[name] += int(int(s.argmax()) == 0)
        n += 1
    return {"items": n, "choices": k, **{f"{name}_acc": h / n for name, h in hits.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--pppl-rows", type=int, default=16, help="rows for pseudo-perplexity (T forwards each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/llmlab-bench/clm_vs_mlm", help="prepared data + runs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--retrain", action="store_true", help="retrain even if WORK/runs/OBJ/final has --steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    cfg = load_pretrain_config("tiny", overrides=[f"data.dir={work / 'data'}", "progress=false"])
    data_dir = ensure_dataset(cfg.data, progress=False)

    t0 = time.perf_counter()
    clm, tok, clm_metrics, clm_tps = train("clm", args, data_dir, work / "runs")
    mlm, mlm_tok, mlm_metrics, mlm_tps = train("mlm", args, data_dir, work / "runs")
    mask_id, vocab = mlm_tok.mask_id, tok.vocab_size
    ids = held_out(data_dir, args.eval_rows)
    print("[bench] evaluating", flush=True)
    report = {
        "setup": {
            "shape": "tiny preset (d=256, 4 layers, 4 heads, 2 kv heads, vocab 4096 + [MASK] for the MLM)",
            "corpus": "tinyshakespeare (BPE 4096, held-out split)",
            "steps": args.steps,
            "tokens_per_step": args.batch * SEQ,
            "median_train_tokens_per_s": {"clm": clm_tps, "mlm": mlm_tps},
            "final_val": {
                "clm_loss": clm_metrics.get("val_loss"),
                "mlm_masked_loss": mlm_metrics.get("val_loss"),
                "mlm_masked_acc": mlm_metrics.get("val_masked_acc"),
            },
        },
        "masked_token": masked_accuracy(clm, mlm, ids, mask_id, vocab),
        "pseudo_perplexity": pseudo_perplexity(clm, mlm, ids[: args.pppl_rows], mask_id),
        "next_token": next_token(clm, mlm, ids, mask_id),
        "generation": generation(clm, mlm, ids[:16], mask_id, tok),
        "cloze": cloze(clm, mlm, ids, mask_id, tok),
    }
    report["seconds_total"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
