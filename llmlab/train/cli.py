"""``llmlab pretrain``: train a model from a preset / YAML config with ``key=value`` overrides.

Kept import-light: torch and the trainer load inside the handler.
"""

from __future__ import annotations

import argparse

from llmlab.cliargs import add_config_arguments, overrides_from
from llmlab.outputs import add_output_argument, run_summary


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a model (preset, YAML config, key=value overrides; --resume continues a run)",
        description=(
            "Pretrain a decoder-only Transformer. Settings come from a preset (default 'tiny'), then "
            "--config YAML, then key=value overrides: 'train.max_steps=100', 'model.n_layers=2', or a bare "
            "'max_steps=100' when only one section has that key. Under torchrun it runs DDP/FSDP2."
        ),
    )
    add_config_arguments(
        p, "tiny (CPU, minutes) or gpt2-124m (GPU); default tiny, or the run's own on --resume"
    )
    add_output_argument(
        p, "run directory: checkpoints, metrics.jsonl, loss_curve.png, tb/, final/", resume=True
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="MODEL",
        help="continual pre-training: start from this model's weights and tokenizer (llmlab/HF dir, .gguf, "
        "run dir, smollm2); the data is tokenized with its tokenizer, model.* overrides such as "
        "max_seq_len or rope_scaling.type apply on top",
    )
    p.set_defaults(func=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    # torch and the trainer load here, not at import: `llmlab --help` stays instant.
    from llmlab.recipes.pretrain import load_pretrain_config, run_pretrain, saved_config
    from llmlab.train.threads import configure_cpu_threads

    configure_cpu_threads()
    base = saved_config(args.out) if args.resume else None
    init_from = None if base is not None else args.init_from  # a resumed run keeps its own init_from
    cfg = load_pretrain_config(args.preset, args.config, overrides_from(args), base=base, init_from=init_from)
    metrics = run_pretrain(cfg, args.out, resume=args.resume)
    shown = {k: round(v, 4) for k, v in metrics.items() if k in ("loss", "val_loss", "val_ppl", "val_bpb")}
    print(f"done: {shown}")
    print(
        run_summary(
            args.out,
            "final/: the model; metrics.jsonl, loss_curve.png",
            "pretrain_report.json",
            f'llmlab generate {args.out} --prompt "Once upon a time" --max-tokens 64',
        )
    )
    return 0
