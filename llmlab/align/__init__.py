"""Preference and RL data: what the alignment recipes (:mod:`llmlab.recipes.reward_model`, ``.dpo``, ``.ppo``,
``.grpo``) train on, below them.

- :mod:`~llmlab.align.data`: preference pairs (hh-rlhf, GSM8K solution pairs, the task suite, JSONL), validation,
  tokenization with the SFT chat template, batch sources.
- :mod:`~llmlab.align.reward_model`: the reward model (a Transformer + a scalar head on the last token): save,
  load, score, held-out accuracy and margins.
- :mod:`~llmlab.align.rollout`: verifiable problems and rewards, rollouts through the shared inference engine,
  RL batches; on-policy preference pairs.

The losses are in :mod:`llmlab.losses`; the runs (``llmlab rm|align|ppo|grpo``) in :mod:`llmlab.recipes`.
"""
