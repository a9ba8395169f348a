"""Preference alignment and RLHF.

- :mod:`~llmlab.align.losses`: every loss as a pure function (Bradley-Terry, DPO/cDPO, IPO, KTO, ORPO, SimPO;
  PPO's KL-shaped rewards, GAE, clipped policy/value losses, whitening; GRPO's group advantages and objective).
- :mod:`~llmlab.align.data`: preference pairs (hh-rlhf, GSM8K solution pairs, the task suite, JSONL), validation,
  tokenization with the SFT chat template, batch sources.
- :mod:`~llmlab.align.reward_model`: ``llmlab rm`` (scalar head on the last token, held-out accuracy, margins).
- :mod:`~llmlab.align.offline`: ``llmlab align --loss dpo|ipo|kto|orpo|simpo`` (reference log-probs cached once).
- :mod:`~llmlab.align.rollout`, :mod:`~llmlab.align.ppo`, :mod:`~llmlab.align.grpo`: ``llmlab ppo`` / ``llmlab grpo``
  with rollouts through the shared inference engine and updates through the shared trainer.
"""
