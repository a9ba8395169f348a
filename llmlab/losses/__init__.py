"""Every training objective of llmlab as a pure function on tensors, with its formula in the docstring.

- :mod:`.lm`: the loss contract (``LossOutput``) and the causal-LM loss; :mod:`.fused_ce`: its chunked head +
  cross-entropy and the compiled cross-entropy with a one-pass backward;
- :mod:`.preference`: Bradley-Terry, DPO/cDPO, DPO-Positive, IPO, SimPO, ORPO, KTO, each registered in
  ``PREFERENCE_OBJECTIVES`` with its own properties (reference-free, default β, unpaired);
- :mod:`.rl`: PPO (KL-shaped rewards, GAE, clipped policy/value losses) and GRPO (group advantages, objective,
  aggregation rules);
- :mod:`.kd`: knowledge distillation (forward KL to a teacher's softened distribution);
- :mod:`.tokens`: label log-probs, masked means and whitening shared by the above.

``from llmlab import losses as L; L.dpo_loss(...)`` reaches all of them.
"""

from __future__ import annotations

from llmlab.losses.kd import kd_loss
from llmlab.losses.lm import MODEL_KWARGS, LossFn, LossOutput, causal_lm_loss
from llmlab.losses.preference import (
    PREFERENCE_OBJECTIVES,
    ObjectiveOutput,
    PreferenceBatch,
    PreferenceObjective,
    PreferenceOptions,
    bradley_terry_loss,
    dpo_loss,
    dpop_loss,
    implicit_rewards,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    log1mexp,
    orpo_loss,
    preference_metrics,
    simpo_loss,
)
from llmlab.losses.rl import (
    GRPO_LOSS_TYPES,
    entropy_from_logits,
    gae,
    grpo_advantages,
    grpo_aggregate,
    grpo_loss,
    kl_penalty_rewards,
    kl_per_token,
    ppo_policy_loss,
    ppo_value_loss,
)
from llmlab.losses.tokens import masked_mean, masked_var, token_logps, whiten

__all__ = [
    "GRPO_LOSS_TYPES",
    "MODEL_KWARGS",
    "PREFERENCE_OBJECTIVES",
    "LossFn",
    "LossOutput",
    "ObjectiveOutput",
    "PreferenceBatch",
    "PreferenceObjective",
    "PreferenceOptions",
    "bradley_terry_loss",
    "causal_lm_loss",
    "dpo_loss",
    "dpop_loss",
    "entropy_from_logits",
    "gae",
    "grpo_advantages",
    "grpo_aggregate",
    "grpo_loss",
    "implicit_rewards",
    "ipo_loss",
    "kd_loss",
    "kl_penalty_rewards",
    "kl_per_token",
    "kto_kl_estimate",
    "kto_loss",
    "log1mexp",
    "masked_mean",
    "masked_var",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "preference_metrics",
    "simpo_loss",
    "token_logps",
    "whiten",
]
