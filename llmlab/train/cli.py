"""``llmlab pretrain``: train a model from a preset / YAML config with ``key=value`` overrides.

Kept import-light: torch and the trainer load inside the handler.
"""

from __future__ import annotations

import argparse


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
    p.add_argument("--preset", default=None, help="named config: tiny (CPU, minutes) or gpt2-124m (GPU)")
    p.add_argument("--config", default=None, help="YAML file of config keys applied over the preset")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, tb/, final/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest (config saved there)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    from llmlab.train.threads import configure_cpu_threads

    configure_cpu_threads()
    from llmlab.train.pretrain import load_pretrain_config, run_pretrain, saved_config

    base = saved_config(args.out) if args.resume else None
    cfg = load_pretrain_config(args.preset, args.config, args.overrides, base=base)
    metrics = run_pretrain(cfg, args.out, resume=args.resume)
    shown = {k: round(v, 4) for k, v in metrics.items() if k in ("loss", "val_loss", "val_ppl", "val_bpb")}
    print(f"done: {shown}; final checkpoint in {args.out}/final")
    return 0
