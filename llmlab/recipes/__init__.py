"""The stages of the pipeline, each a thin recipe over the library (model, losses, Trainer, engine).

One module per stage: :mod:`.pretrain`, :mod:`.sft`, :mod:`.distill`, :mod:`.reward_model`, :mod:`.dpo` (the
DPO family: DPO, DPO-Positive, IPO, KTO, ORPO, SimPO), :mod:`.ppo` and :mod:`.grpo` (both over
:mod:`.rl_loop`). Each holds its typed config, its presets and ``run_*``. What they share lives in
:mod:`.common`; a recipe never imports another recipe (``tests/test_imports.py`` checks it).

Exports load lazily, so the command modules (``llmlab --help``) do not import torch.
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

_LAZY = {
    "PRETRAIN_PRESETS": "llmlab.recipes.pretrain",
    "PretrainConfig": "llmlab.recipes.pretrain",
    "run_pretrain": "llmlab.recipes.pretrain",
    "SFTConfig": "llmlab.recipes.sft",
    "SFT_PRESETS": "llmlab.recipes.sft",
    "run_sft": "llmlab.recipes.sft",
    "DistillConfig": "llmlab.recipes.distill",
    "DISTILL_PRESETS": "llmlab.recipes.distill",
    "run_distill": "llmlab.recipes.distill",
    "RMConfig": "llmlab.recipes.reward_model",
    "run_reward_model": "llmlab.recipes.reward_model",
    "AlignConfig": "llmlab.recipes.dpo",
    "ALIGN_PRESETS": "llmlab.recipes.dpo",
    "run_offline": "llmlab.recipes.dpo",
    "PPOConfig": "llmlab.recipes.ppo",
    "PPO_PRESETS": "llmlab.recipes.ppo",
    "run_ppo": "llmlab.recipes.ppo",
    "GRPOConfig": "llmlab.recipes.grpo",
    "GRPO_PRESETS": "llmlab.recipes.grpo",
    "run_grpo": "llmlab.recipes.grpo",
}

__getattr__ = lazy_exports("llmlab.recipes", _LAZY)

__all__ = sorted(_LAZY)
