"""The main job: train a tokenizer and a tiny language model from scratch on this machine, in minutes.

    python -m llmlab.apps.demo [--out runs/demo] [--corpus tinystories] [key=value ...]

1. cleans and splits a bundled corpus, trains a byte-level BPE tokenizer on the training documents and
   writes token shards (``llmlab.data.prepare``);
2. pretrains the ``tiny`` model preset with the one Trainer (bf16 autocast, AdamW, cosine schedule, eval,
   checkpoints, loss plot);
3. measures held-out bits per byte on the whole validation split next to ``gzip -9`` and ``xz -9e`` on the
   same text (a language model is a compressor: it should beat both);
4. prints samples from the trained model through the inference engine (greedy and top-k).

Overrides use the ``llmlab pretrain`` keys, e.g. ``max_steps=200`` for a quicker run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_OVERRIDES = [
    # ~3.4M parameters; 600 steps x 16 x 256 tokens ~ 2.5M tokens, several epochs of the corpus.
    "max_steps=600",
    "batch_size=16",
    "seq_len=256",
    "warmup_steps=40",
    "lr=2e-3",
    "min_lr=1e-4",
    "eval_every=150",
    "save_every=300",
    "eval_batches=8",
    "log_every=10",
    "model.dropout=0.1",
    # compile=true makes steps ~1.5x faster on this CPU, but its first compilation took from ~1 to 4+ minutes
    # on a busy 2-core machine: too unpredictable for a demo with a time budget, so it stays opt-in.
]
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmlab.apps.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--corpus", default="tinystories", help="bundled corpus (default tinystories)")
    parser.add_argument(
        "--train-minutes",
        type=float,
        default=6.0,
        help="training time budget: max_steps is lowered after a few timed steps if they would not fit (default 6)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="llmlab pretrain config overrides")
    args = parser.parse_args(argv)
    from llmlab.errors import LLMLabError
    from llmlab.train.threads import configure_cpu_threads

    configure_cpu_threads()

    try:
        return run(args)
    except LLMLabError as exc:
        if args.debug:
            raise
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import torch

    from llmlab.data.loader import iterate_split, read_meta
    from llmlab.data.prepare import VAL_TEXT_FILE, compression_baselines
    from llmlab.train.pretrain import build_trainer, load_pretrain_config
    from llmlab.train.trainer import make_eval_fn

    t_start = time.perf_counter()
    out = Path(args.out)
    data_dir = out / "data"
    cfg = load_pretrain_config(
        "tiny",
        overrides=[*DEMO_OVERRIDES, f"data.dir={data_dir}", f"data.corpus={args.corpus}", *args.overrides],
    )
    print(
        f"== llmlab demo: {args.corpus} -> {out}  (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )

    # 1-2. data + tokenizer (prepared on first use), model, training.
    trainer, data_dir = build_trainer(cfg, out)
    t_data = time.perf_counter() - t_start
    meta = read_meta(data_dir)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    n_params = trainer.model.num_params()
    print(
        f"data: {tr['documents']} train / {va['documents']} val documents, {tr['tokens']:,} / {va['tokens']:,} "
        f"tokens, vocab {meta['vocab_size']} ({t_data:.0f}s)"
    )
    print(
        f"model: {n_params / 1e6:.2f}M parameters (d={cfg.model.d_model}, {cfg.model.n_layers} layers); "
        f"{cfg.train.max_steps} steps x {cfg.train.batch_size} x {cfg.train.seq_len} tokens, {cfg.train.precision}"
    )
    t0 = time.perf_counter()
    fit_budget(trainer, args.train_minutes * 60)
    metrics = trainer.fit()
    t_train = time.perf_counter() - t0
    print(
        f"trained in {t_train:.0f}s: {metrics.get('tokens_per_s', 0):,.0f} tok/s (last window), "
        f"MFU {100 * metrics.get('mfu', 0):.1f}% of the measured bf16 matmul peak"
    )

    # 3. held-out bits per byte on the whole val split vs. general-purpose compressors on the same text.
    full_val = make_eval_fn(
        lambda: iterate_split(data_dir, "val", cfg.train.seq_len, 16),
        bytes_per_token=va["bytes"] / va["tokens"],
    )
    trainer.model.eval()
    with torch.no_grad(), trainer.autocast():
        val = full_val(trainer.model)
    baselines = compression_baselines((data_dir / VAL_TEXT_FILE).read_bytes())
    print(f"\nheld-out ({va['bytes']:,} bytes of text never trained on), bits per byte (lower is better):")
    print(
        f"  llmlab tiny LM : {val['bpb']:.3f}   (loss {val['loss']:.3f} nats/token, perplexity {val['ppl']:.1f})"
    )
    print(f"  xz -9e         : {baselines['xz-9']:.3f}")
    print(f"  gzip -9        : {baselines['gzip-9']:.3f}")
    beats = val["bpb"] < min(baselines.values())
    print(f"  -> the model {'beats' if beats else 'does NOT beat'} both compressors")

    # 4. samples through the inference engine, from the saved final checkpoint.
    from llmlab import LLM, SamplingParams

    llm = LLM(out / "final")
    greedy = SamplingParams(temperature=0.0, max_tokens=48, repetition_penalty=1.1)
    topk = SamplingParams(temperature=0.8, top_k=40, max_tokens=48, seed=0)
    print("\nsamples (greedy | temperature 0.8, top-k 40):")
    for prompt in PROMPTS:
        for tag, o in zip(("greedy", "top-k "), llm.generate([prompt, prompt], [greedy, topk])):
            # Decode prompt and completion together: a completion's first token may carry the space.
            print(
                f"  [{tag}] {_one_line(llm.tokenizer.decode(o.prompt_token_ids + o.token_ids, skip_special_tokens=True))}"
            )

    total = time.perf_counter() - t_start
    print(f"\nwhere everything went (total {total / 60:.1f} min):")
    print(f"  tokenizer + token shards : {data_dir}/  (tokenizer/, train.bin, val.bin, val.txt, meta.json)")
    print(f"  final model              : {out / 'final'}/  (llmlab.load, llmlab generate, llmlab chat)")
    print(f"  resumable checkpoints    : {out}/ckpt-*/  (llmlab pretrain --out {out} --resume)")
    print(f"  metrics                  : {out / 'metrics.jsonl'}, TensorBoard: {out / 'tb'}")
    print(f"  loss curve               : {out / 'loss_curve.png'}")
    return 0 if beats else 1


def fit_budget(trainer, seconds: float, probe_steps: int = 5) -> None:
    """Take 1 + ``probe_steps`` real (warmup) steps, time them, and lower ``max_steps`` to fit ``seconds``.

    On a busy shared machine a step can be several times slower than on an idle one; a shorter run keeps the
    demo inside its time budget (the cosine schedule is set by the new ``max_steps``, as it has barely moved).
    """
    cfg = trainer.cfg
    trainer.logger.reset()  # fit() will not, as it starts after the probe steps

    def step() -> None:
        trainer.train_step([trainer.train_source.next_batch() for _ in range(cfg.grad_accum_steps)])

    start = time.perf_counter()
    step()  # untimed: includes torch.compile's first compilation
    if cfg.compile:
        print(f"[demo] first step (torch.compile included) took {time.perf_counter() - start:.0f}s")
    t0 = time.perf_counter()
    for _ in range(probe_steps):
        step()
    per_step = (time.perf_counter() - t0) / probe_steps
    left = seconds - (time.perf_counter() - start)
    # 15% headroom for evaluations, checkpoints and the load of a shared machine changing under us.
    fits = trainer.step + int(0.85 * max(left, 0.0) / per_step)
    if fits < cfg.max_steps:
        print(
            f"[demo] {per_step:.2f}s/step here: {cfg.max_steps} steps would take {cfg.max_steps * per_step / 60:.1f} "
            f"min; training {max(fits, 2 * probe_steps)} steps to stay within {seconds / 60:.1f} min"
        )
        cfg.max_steps = max(fits, 2 * probe_steps)
        cfg.eval_every = max(cfg.max_steps // 4, 1)
        cfg.save_every = max(cfg.max_steps // 2, 1)


def _one_line(text: str, width: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
