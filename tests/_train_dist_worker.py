"""Worker for the distributed trainer tests (run under torchrun): train the tiny model on byte shards.

usage: torchrun --nproc_per_node=N tests/_train_dist_worker.py DATA_DIR OUT_DIR PARALLEL STEPS SAVE_EVERY
Each rank takes ``8 / world_size`` rows of every global batch of 8, so any world size sees the same data.
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _train_helpers import tiny_model_config  # noqa: E402

from llmlab.data.loader import PackedLoader  # noqa: E402
from llmlab.model import Transformer  # noqa: E402
from llmlab.train import TrainConfig, Trainer  # noqa: E402
from llmlab.train import distributed as dist_utils  # noqa: E402

GLOBAL_BATCH, SEQ = 8, 32


def config(steps: int, save_every: int, parallel: str, world: int) -> TrainConfig:
    return TrainConfig(
        precision="fp32",
        seq_len=SEQ,
        batch_size=GLOBAL_BATCH // world,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        max_steps=steps,
        eval_every=0,
        log_every=1,
        save_every=save_every,
        keep_last=0,
        progress=False,
        tensorboard=False,
        plot=False,
        peak_tflops=1.0,
        parallel=parallel,
    )


def build(data_dir: str, out_dir: str, parallel: str, steps: int, save_every: int) -> Trainer:
    info = dist_utils.setup("cpu")
    torch.manual_seed(0)
    model = Transformer(tiny_model_config())
    cfg = config(steps, save_every, parallel, info.world_size)
    source = PackedLoader(
        data_dir, "train", cfg.batch_size, SEQ, seed=0, rank=info.rank, world_size=info.world_size
    )
    return Trainer(model, cfg, source, out_dir=out_dir)


if __name__ == "__main__":
    torch.set_num_threads(1)
    data_dir, out_dir, parallel, steps, save_every = sys.argv[1:6]
    build(data_dir, out_dir, parallel, int(steps), int(save_every)).fit()
    dist_utils.teardown()
