"""Training: the one loop (:class:`Trainer`) every stage uses, its config, checkpoints and ``llmlab pretrain``.

    from llmlab.train import Trainer, TrainConfig, LossOutput
    trainer = Trainer(model, TrainConfig(max_steps=100), source, loss_fn=my_loss, out_dir="out")
    trainer.fit()

Exports load lazily, so ``llmlab.train.cli`` (and ``llmlab --help``) do not import torch.
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

_LAZY = {
    "PRETRAIN_PRESETS": "llmlab.train.config",
    "DataConfig": "llmlab.train.config",
    "PretrainConfig": "llmlab.train.config",
    "TrainConfig": "llmlab.train.config",
    "build_optimizer": "llmlab.train.optim",
    "lr_at": "llmlab.train.optim",
    "param_groups": "llmlab.train.optim",
    "LossFn": "llmlab.train.trainer",
    "LossOutput": "llmlab.train.trainer",
    "Trainer": "llmlab.train.trainer",
    "causal_lm_loss": "llmlab.train.trainer",
    "make_eval_fn": "llmlab.train.trainer",
}


__getattr__ = lazy_exports("llmlab.train", _LAZY)


__all__ = list(_LAZY)
