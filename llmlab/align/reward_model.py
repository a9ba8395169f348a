"""Reward model: the Transformer backbone plus a scalar head read at the last real token.

``RewardModel`` *is* a :class:`~llmlab.model.Transformer` (same module names, same checkpoint format) with
one extra ``score`` linear layer, so it saves and loads as an ordinary llmlab checkpoint whose
``model.safetensors`` also holds ``score.weight``/``score.bias`` and whose ``config.json`` carries a
``"reward_model"`` entry. It is trained with the Bradley-Terry loss on preference pairs
(:func:`llmlab.losses.bradley_terry_loss`) through the shared trainer by ``llmlab rm``
(:mod:`llmlab.recipes.reward_model`). This module is the model itself: saving, loading, scoring, evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.align.data import Encoded, PairSource, encode_response, pad_sequences
from llmlab.errors import CheckpointError, ConfigError
from llmlab.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_into,
    load_state_dict,
    read_config,
    save_checkpoint,
)
from llmlab.model.config import ModelConfig
from llmlab.model.transformer import Transformer
from llmlab.tokenizer import TOKENIZER_FILE, Tokenizer
from llmlab.train.distributed import model_device

RM_KEY = "reward_model"


class RewardModel(Transformer):
    """``rewards(input_ids, attention_mask) -> [B]``: ``score(h_last)`` with ``h_last`` the final hidden state
    of each row's last non-pad token (rows are right-padded)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.d_model, 1)
        # Start at reward 0 with small weights: the BT loss only sees differences, so the scale is learned.
        nn.init.normal_(self.score.weight, std=1.0 / (cfg.d_model + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)

    @classmethod
    def from_backbone(cls, model: Transformer) -> RewardModel:
        """A reward model whose trunk is a copy of ``model`` (e.g. the SFT checkpoint) and a fresh head."""
        rm = cls(model.cfg)
        state = {k: v for k, v in model.state_dict().items()}
        missing, unexpected = rm.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"score.weight", "score.bias"}:
            raise CheckpointError(f"backbone does not match the reward model (unexpected: {unexpected[:3]})")
        return rm.to(next(model.parameters()).dtype)

    def rewards(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        hidden = self(input_ids, attention_mask=attention_mask, return_hidden=True)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            last = attention_mask.long().sum(1) - 1
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score(h.to(self.score.weight.dtype)).squeeze(-1).float()


def save_reward_model(
    directory: str | Path, rm: RewardModel, tokenizer: Any, extra: dict | None = None
) -> Path:

    return save_checkpoint(
        directory, rm, tokenizer, extra_config={RM_KEY: {"head": "score", **(extra or {})}}
    )


def load_reward_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Any]:
    """Load a reward-model checkpoint written by :func:`save_reward_model` or by ``llmlab rm``."""

    directory = Path(directory)
    config = read_config(directory)
    if "model" not in config:
        raise CheckpointError(f"{directory / CONFIG_FILE}: not an llmlab checkpoint")
    state = load_state_dict(directory / WEIGHTS_FILE)
    if "score.weight" not in state:
        raise CheckpointError(
            f"{directory}: not a reward model (no 'score' head in {WEIGHTS_FILE}); train one with 'llmlab rm'"
        )
    cfg = ModelConfig.from_dict(config["model"], source=str(directory / CONFIG_FILE))
    rm = RewardModel(cfg)
    load_into(rm, state, str(directory / WEIGHTS_FILE))
    rm.to(device).eval()
    tok = Tokenizer.from_file(directory) if (directory / TOKENIZER_FILE).is_file() else None
    return rm, tok


def check_same_tokenizer(a: Any, b: Any, what: str) -> None:
    """Refuse to pair models whose tokenizers differ: their token ids would mean different text."""
    if a is None or b is None:
        raise CheckpointError(f"{what}: a tokenizer is missing, cannot check it matches the policy's")
    if a.vocab_size != b.vocab_size or a.backend.get_vocab() != b.backend.get_vocab():
        raise CheckpointError(
            f"{what}: its tokenizer differs from the policy's (vocab {b.vocab_size} vs {a.vocab_size}); "
            "reward model, reference and policy must share one tokenizer"
        )
    if (a.eos_id, a.bos_id) != (b.eos_id, b.bos_id):
        raise CheckpointError(f"{what}: its special tokens differ from the policy's (eos/bos ids)")


# --------------------------------------------------------------------------------------- training
class RewardPairSource(PairSource):
    """Pairs batched for a reward model: full sequences (no next-token shift), chosen rows then rejected."""

    def collate(self, idx: Sequence[int]) -> dict[str, Tensor]:
        seqs = [self.pairs[i].chosen for i in idx] + [self.pairs[i].rejected for i in idx]
        # pad_sequences drops the last token for next-token prediction; a reward model reads the whole
        # sequence, so append one pad token that the shift then removes.
        batch = pad_sequences([Encoded(s.prompt, s.response + [self.pad_id]) for s in seqs], self.pad_id)
        batch.pop("labels")
        batch["margin"] = torch.tensor([self.pairs[i].margin for i in idx], dtype=torch.float32)
        return batch


def rewards_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    device = model_device(inner)  # batches are built on the CPU; the Trainer may have moved the model
    return inner.rewards(batch["input_ids"].to(device), batch["attention_mask"].to(device))


@dataclass
class RMEval:
    accuracy: float
    margins: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        m = torch.tensor(self.margins)
        return {
            "accuracy": self.accuracy,
            "margin_mean": float(m.mean()),
            "margin_median": float(m.median()),
            "margin_p10": float(m.quantile(0.1)),
            "margin_p90": float(m.quantile(0.9)),
        }


@torch.no_grad()
def evaluate_reward_model(rm: nn.Module, source: RewardPairSource, batch_size: int = 16) -> RMEval:
    """Held-out pairwise accuracy (ties count as wrong) and the per-pair margins ``r_w − r_l``."""
    was = rm.training
    rm.eval()
    margins: list[float] = []
    for batch in source.iterate(batch_size):
        r = rewards_of(rm, batch)
        B = r.shape[0] // 2
        margins += (r[:B] - r[B:]).tolist()
    rm.train(was)
    acc = sum(m > 0 for m in margins) / max(len(margins), 1)
    return RMEval(acc, margins)


def plot_margins(margins: Sequence[float], path: str | Path, title: str = "held-out reward margins") -> Path:
    """Histogram of ``r_chosen − r_rejected`` (right of 0 = ranked correctly)."""
    import matplotlib  # optional: only the margin plot needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(list(margins), bins=40, color="#4472c4")
    ax.axvline(0.0, color="k", lw=1)
    ax.set_xlabel("r(chosen) - r(rejected)")
    ax.set_ylabel("pairs")
    acc = sum(m > 0 for m in margins) / max(len(margins), 1)
    ax.set_title(f"{title} (accuracy {acc:.1%})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def score_responses(
    rm: RewardModel,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    responses: Sequence[str],
    max_len: int | None = None,
    batch_size: int = 16,
) -> list[float]:
    """Reward of each (prompt conversation, response) pair."""
    if len(prompts) != len(responses):
        raise ConfigError(f"got {len(prompts)} prompts for {len(responses)} responses")
    max_len = max_len or rm.cfg.max_seq_len
    encs = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        enc = encode_response(tokenizer, p, r, f"response {i}")
        encs.append(_clip(enc, max_len))
    return score_encoded(rm, encs, tokenizer.pad_id, batch_size)


def _clip(enc: Encoded, max_len: int) -> Encoded:
    """Left-truncate to ``max_len`` tokens: the reward is read at the end, so keep the end."""
    if len(enc.ids) <= max_len:
        return enc
    drop = len(enc.ids) - max_len
    tail = enc.ids[drop:]
    n_prompt = max(1, len(enc.prompt) - drop)
    return Encoded(tail[:n_prompt], tail[n_prompt:])


@torch.no_grad()
def score_encoded(rm: RewardModel, encs: Sequence[Encoded], pad_id: int, batch_size: int = 16) -> list[float]:
    was = rm.training
    rm.eval()
    out: list[float] = []
    for s in range(0, len(encs), batch_size):
        chunk = [Encoded(e.prompt, e.response + [pad_id]) for e in encs[s : s + batch_size]]
        batch = pad_sequences(chunk, pad_id)
        out += rewards_of(rm, batch).tolist()
    rm.train(was)
    return out
