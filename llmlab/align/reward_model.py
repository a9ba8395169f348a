"""Reward model: the Transformer backbone plus a scalar head read at the last real token.

``RewardModel`` *is* a :class:`~llmlab.model.Transformer` (same module names, same checkpoint format) with
one extra ``score`` linear layer, so it saves and loads as an ordinary llmlab checkpoint whose
``model.safetensors`` also holds ``score.weight``/``score.bias`` and whose ``config.json`` carries a
``"reward_model"`` entry. It is trained with the Bradley-Terry loss on preference pairs
(:func:`llmlab.align.losses.bradley_terry_loss`) through the shared trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.align.data import Encoded, PairSource, encode_response, pad_sequences
from llmlab.align.losses import bradley_terry_loss
from llmlab.align.rollout import OnPolicyConfig
from llmlab.errors import CheckpointError, ConfigError
from llmlab.model.config import ModelConfig
from llmlab.model.transformer import Transformer
from llmlab.train.config import TrainConfig, preference_train_config
from llmlab.train.distributed import model_device
from llmlab.train.logging import write_report

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
    from llmlab.model.checkpoint import save_checkpoint

    return save_checkpoint(
        directory, rm, tokenizer, extra_config={RM_KEY: {"head": "score", **(extra or {})}}
    )


def load_reward_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Any]:
    """Load a reward-model checkpoint written by :func:`save_reward_model` or by ``llmlab rm``."""
    from llmlab.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_into, load_state_dict, read_config
    from llmlab.tokenizer import TOKENIZER_FILE, Tokenizer

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


def make_rm_loss(use_margin: bool = False):
    """Bradley-Terry loss over a :class:`RewardPairSource` batch (per-pair sum, weight = pairs)."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> Any:
        from llmlab.train import LossOutput

        r = _rewards(model, batch)
        B = r.shape[0] // 2
        rc, rr = r[:B], r[B:]
        losses = bradley_terry_loss(rc, rr, batch["margin"] if use_margin else None)
        diff = (rc - rr).detach()
        metrics = {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}
        return LossOutput(losses.sum(), float(B), metrics)

    return loss_fn


def _rewards(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
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
        r = _rewards(rm, batch)
        B = r.shape[0] // 2
        margins += (r[:B] - r[B:]).tolist()
    rm.train(was)
    acc = sum(m > 0 for m in margins) / max(len(margins), 1)
    return RMEval(acc, margins)


def plot_margins(margins: Sequence[float], path: str | Path, title: str = "held-out reward margins") -> Path:
    """Histogram of ``r_chosen − r_rejected`` (right of 0 = ranked correctly)."""
    import matplotlib

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
        out += _rewards(rm, batch).tolist()
    rm.train(was)
    return out


# ------------------------------------------------------------------------------------------ runner
@dataclass
class RMConfig:
    """``llmlab rm`` settings: start from ``model`` (usually the SFT checkpoint), train a scalar head and the
    trunk with the Bradley-Terry loss, report held-out accuracy and the margin distribution."""

    model: str = ""
    data: list[str] = field(default_factory=lambda: ["hh-rlhf"])
    heldout: str | None = "hh-rlhf-heldout"  # None: split n_heldout pairs off the data
    n_heldout: int = 312
    max_pairs: int | None = None
    max_len: int = 256
    use_margin: bool = False  # use each pair's "margin" field in the loss
    # "onpolicy:SOURCE" data: pairs sampled from the starting (SFT) model, judged by the verifier
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    skip_invalid: bool = False
    eval_batch_size: int = 16
    train: TrainConfig = field(
        default_factory=lambda: preference_train_config(
            lr=1e-5, min_lr=1e-6, warmup_steps=10, max_steps=200, batch_size=8, eval_every=50, log_every=10
        )
    )

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("config key 'data' needs at least one preference source")
        if self.max_len < 8:
            raise ConfigError(f"config key 'max_len' must be >= 8, got {self.max_len}")


def run_reward_model(cfg: RMConfig, out_dir: str | Path, model=None, tokenizer=None) -> dict[str, Any]:
    """Train a reward model; writes ``OUT/final`` (a reward-model checkpoint), ``reward_margins.png`` and
    ``rm_eval.json``. Returns the final metrics."""
    from llmlab.align.data import DataStats, encode_pairs, load_pairs, split_pairs
    from llmlab.align.offline import load_policy
    from llmlab.align.rollout import gather_pairs
    from llmlab.train import Trainer

    cfg.validate()
    out = Path(out_dir)
    if model is None:
        model, tokenizer = load_policy(cfg.model, cfg.train.device)
    stats = DataStats()
    # On-policy sources sample the causal LM before it becomes the reward model's trunk.
    policy = None if isinstance(model, RewardModel) else model
    pairs = gather_pairs(
        cfg.data, policy, tokenizer, stats, cfg.skip_invalid, cfg.max_pairs, cfg.onpolicy, cfg.train.seed
    )
    rm = model if isinstance(model, RewardModel) else RewardModel.from_backbone(model)
    if cfg.heldout is not None:
        train_pairs, held_pairs = pairs, load_pairs(cfg.heldout, cfg.skip_invalid, stats, cfg.n_heldout)
    else:
        train_pairs, held_pairs = split_pairs(pairs, min(cfg.n_heldout, len(pairs) // 5), seed=cfg.train.seed)
    pad = tokenizer.pad_id
    train_src = RewardPairSource(
        encode_pairs(tokenizer, train_pairs, cfg.max_len, cfg.skip_invalid, stats),
        cfg.train.batch_size,
        pad,
        seed=cfg.train.seed,
    )
    held_src = RewardPairSource(
        encode_pairs(tokenizer, held_pairs, cfg.max_len, cfg.skip_invalid, stats), cfg.train.batch_size, pad
    )
    trainer = Trainer(
        rm,
        cfg.train,
        train_src,
        loss_fn=make_rm_loss(cfg.use_margin),
        eval_fn=lambda m: evaluate_reward_model(m, held_src, cfg.eval_batch_size).summary(),
        tokenizer=tokenizer,
        out_dir=out,
        extra_config={RM_KEY: {"head": "score"}},
    )
    metrics = trainer.fit()
    ev = evaluate_reward_model(rm, held_src, cfg.eval_batch_size)
    plot_margins(ev.margins, out / "reward_margins.png")
    report = {
        **ev.summary(),
        "pairs_train": len(train_src.pairs),
        "pairs_heldout": len(held_src.pairs),
        "skipped_invalid": stats.skipped_invalid,
        "truncated": stats.truncated,
        "contaminates": sorted({p.contaminates for p in pairs if p.contaminates}),
    }
    write_report(out / "rm_eval.json", report)
    return {**metrics, **{f"heldout_{k}": v for k, v in report.items()}}
