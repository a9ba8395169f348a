"""Training: the one loop (:class:`Trainer`) every stage uses, its config, checkpoints (:mod:`.checkpointing`) and
the one evaluation loop (:func:`evaluate_loss`). Pretraining's recipe is :mod:`llmlab.recipes.pretrain`.

    from llmlab.train import Trainer, TrainConfig, LossOutput
    trainer = Trainer(model, TrainConfig(max_steps=100), source, loss_fn=my_loss, eval_fn=..., out_dir="out")
    trainer.fit(on_eval=..., should_stop=..., save_final=...)   # hooks: all optional

Exports load lazily, so ``llmlab.train.cli`` (and ``llmlab --help``) do not import torch.
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

_LAZY = {
    "evaluate_loss": "llmlab.train.evaluation",
    "make_eval_fn": "llmlab.train.evaluation",
    "TrainConfig": "llmlab.train.config",
    "build_optimizer": "llmlab.train.optim",
    "lr_at": "llmlab.train.optim",
    "param_groups": "llmlab.train.optim",
    "LossFn": "llmlab.losses.lm",
    "LossOutput": "llmlab.losses.lm",
    "Trainer": "llmlab.train.trainer",
    "causal_lm_loss": "llmlab.losses.lm",
}


__getattr__ = lazy_exports("llmlab.train", _LAZY)


__all__ = list(_LAZY)
