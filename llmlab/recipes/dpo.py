"""Offline preference optimization: DPO, IPO, KTO, ORPO and SimPO through the shared trainer.

``llmlab align --loss dpo --base ckpt/ data=[tasks]`` (or :func:`run_offline`):

1. load the policy (and its tokenizer), optionally wrap it with LoRA;
2. tokenize the preference pairs (:mod:`llmlab.align.data`) and hold some out;
3. **compute the reference log-probs once** and cache them in the batch source (``ref_logps.safetensors`` in
   the output dir). The reference is the policy *before* training: with LoRA it is the same weights with the
   adapter disabled (:func:`llmlab.model.lora.disable_adapter`), so no second copy of the model is ever held;
   without LoRA the cache is filled before the first step, so no copy is needed either. A different reference
   checkpoint can be given with ``ref=...`` (loaded, used, freed);
4. train with the loss of ``--loss`` (pure functions in :mod:`llmlab.losses`), logging the implicit
   rewards of chosen/rejected responses, reward accuracy, margins and the sequence log-ratio to the reference.

ORPO and SimPO are reference-free (no cache). ORPO adds the chosen response's length-averaged NLL to its
odds-ratio term, per pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlab.align.data import (
    DataStats,
    EncodedPair,
    PairSource,
    UnpairedSource,
    encode_pairs,
    load_pairs,
    split_pairs,
)
from llmlab.align.reward_model import check_same_tokenizer
from llmlab.align.rollout import OnPolicyConfig, gather_pairs
from llmlab.errors import ConfigError
from llmlab.losses import (
    PREFERENCE_OBJECTIVES,
    LossOutput,
    PreferenceBatch,
    PreferenceOptions,
    preference_metrics,
    token_logps,
)
from llmlab.model.checkpoint import atomic_write_file
from llmlab.model.lora import LoRAConfig, disable_adapter
from llmlab.recipes.common import load_policy, preference_train_config, prepare_policy, save_policy
from llmlab.train import Trainer
from llmlab.train.config import TrainConfig
from llmlab.train.distributed import model_device, to_device
from llmlab.train.evaluation import evaluate_loss
from llmlab.train.logging import config_dict, write_report

LOSSES = tuple(PREFERENCE_OBJECTIVES)
# The reference-free objectives (no cached reference log-probs), as each objective declares.
REFERENCE_FREE = tuple(name for name, o in PREFERENCE_OBJECTIVES.items() if o.reference_free)
REF_CACHE_FILE = "ref_logps.safetensors"
REPORT_FILE = "align_report.json"
# What run_offline reports per round when rounds > 1.
ROUND_SUMMARY_KEYS = (
    "onpolicy_sample_accuracy",
    "onpolicy_pairs",
    "pairs_train",
    "loss",
    "val_loss",
    "val_reward_accuracy",
)


@dataclass
class AlignConfig:
    """``llmlab align`` settings. ``beta=None`` takes the loss's usual default (SimPO 2.0, others 0.1)."""

    model: str = ""  # policy to start from: llmlab checkpoint dir (or anything llmlab.load reads)
    ref: str | None = None  # reference checkpoint; default: the starting policy itself
    data: list[str] = field(default_factory=lambda: ["tasks"])
    heldout: str | None = None  # held-out pairs source; default: n_heldout pairs split off the data
    n_heldout: int = 200
    max_pairs: int | None = None
    max_len: int = 256
    skip_invalid: bool = False
    loss: str = "dpo"
    beta: float | None = None
    label_smoothing: float = 0.0  # cDPO
    rpo_alpha: float = (
        0.0  # dpo/dpop/ipo: + alpha x chosen NLL per token (RPO, TRL's rpo_alpha): keeps chosen likely
    )
    simpo_gamma: float = 0.5
    dpop_lambda: float = (
        50.0  # dpop: weight of the penalty on the chosen response falling below the reference
    )
    # "onpolicy:SOURCE" data (e.g. onpolicy:tasks): pairs from the starting policy's own samples, judged by
    # the verifier (see llmlab.align.rollout.verifier_pairs)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    # Iterative on-policy training (iterative RPO, Pang et al. 2024): each round resamples the onpolicy: pairs
    # from the current policy, makes that policy the reference (under LoRA the reference stays the base with
    # the adapter off), and trains train.max_steps steps. Rounds before the last write to OUT/round-N.
    rounds: int = 1
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    use_lora: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval_batch_size: int = 16
    train: TrainConfig = field(
        default_factory=lambda: preference_train_config(
            lr=5e-6, min_lr=5e-7, warmup_steps=10, max_steps=200, batch_size=8, eval_every=50, log_every=10
        )
    )

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"config key 'loss' must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"config key 'beta' must be > 0, got {self.beta}")
        if self.rpo_alpha < 0:
            raise ConfigError(f"config key 'rpo_alpha' must be >= 0, got {self.rpo_alpha}")
        if self.dpop_lambda < 0:
            raise ConfigError(f"config key 'dpop_lambda' must be >= 0, got {self.dpop_lambda}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"config key 'label_smoothing' must be in [0, 0.5), got {self.label_smoothing}")
        if self.max_len < 8:
            raise ConfigError(f"config key 'max_len' must be >= 8, got {self.max_len}")
        if not self.data:
            raise ConfigError("config key 'data' needs at least one preference source")
        if self.rounds < 1:
            raise ConfigError(f"config key 'rounds' must be >= 1, got {self.rounds}")
        if self.rounds > 1 and not any(d.startswith("onpolicy:") for d in self.data):
            raise ConfigError(
                "config key 'rounds' > 1 resamples onpolicy: pairs each round, but 'data' has no onpolicy: source"
            )

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else PREFERENCE_OBJECTIVES[self.loss].default_beta


ALIGN_PRESETS: dict[str, AlignConfig] = {
    # Iterative DPO of the tiny SFT model (pass model=...) on its own verifier-judged samples of task-suite
    # prompts, with the chosen response's NLL added (rpo_alpha): 3 rounds of sample -> 300 steps, ~10 CPU
    # minutes (history: BENCHMARKS.md, "Preset run histories").
    "tiny-dpo": AlignConfig(
        data=["onpolicy:tasks"],
        loss="dpo",
        beta=0.1,
        rpo_alpha=1.0,
        max_len=128,
        n_heldout=100,
        rounds=3,
        train=preference_train_config(
            lr=3e-5, min_lr=3e-6, warmup_steps=5, max_steps=300, batch_size=16, eval_every=0, log_every=50
        ),
    ),
    # LoRA DPO of SmolLM2-135M-Instruct on hh-rlhf pairs on a CPU.
    "smollm2-dpo-lora": AlignConfig(
        model="smollm2",
        data=["hh-rlhf"],
        heldout="hh-rlhf-heldout",
        loss="dpo",
        max_len=256,
        skip_invalid=True,  # hh-rlhf dialogues longer than the context are counted and skipped
        use_lora=True,
        lora=LoRAConfig(r=16, alpha=32.0),
        train=preference_train_config(
            lr=5e-5, min_lr=5e-6, warmup_steps=5, max_steps=50, batch_size=4, eval_every=0, log_every=5
        ),
    ),
}


# ---------------------------------------------------------------------------------- log-probs
def sequence_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed response log-probs ``[N]`` and response token counts ``[N]`` of a padded batch."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    tok = token_logps(logits, batch["labels"])
    return tok.sum(-1), (batch["labels"] != -100).sum(-1).to(tok.dtype)


@torch.no_grad()
def compute_reference_logps(
    model: nn.Module, source: PairSource, batch_size: int = 16, desc: str = "reference log-probs"
) -> Tensor:
    """``[n, 2]`` summed log-probs under ``model`` of every example's two sequences, in source order.

    For :class:`PairSource` the two are (chosen, rejected); for :class:`UnpairedSource` (example, its KL
    completion). Runs once; with a LoRA model, call it inside ``disable_adapter(model)``.
    """
    device = model_device(model)
    was = model.training
    model.eval()
    rows: list[Tensor] = []
    n = source.num_examples if isinstance(source, UnpairedSource) else len(source.pairs)
    saved, source.ref_logps = source.ref_logps, None
    with tqdm(total=n, desc=desc, unit="ex", leave=False, disable=n < 64) as bar:
        for batch in source.iterate(batch_size):
            sums, _ = sequence_logps(model, to_device(batch, device))
            k = sums.shape[0] // 2
            rows.append(torch.stack([sums[:k], sums[k:]], dim=1).float().cpu())
            bar.update(k)
    source.ref_logps = saved
    model.train(was)
    return torch.cat(rows)


def _fingerprint(pairs: list[EncodedPair], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in pairs:
        h.update(json.dumps([p.chosen.prompt, p.chosen.response, p.rejected.response]).encode())
    return h.hexdigest()[:16]


def cached_reference(
    model: nn.Module, source: PairSource, cache_dir: Path | None, tag: str, batch_size: int, use_lora: bool
) -> Tensor:
    """Reference log-probs from ``cache_dir/ref_logps.safetensors`` when it was computed for the same data and
    reference, else computed (adapter disabled under LoRA) and stored there."""
    key = f"{tag}-{_fingerprint(list(source.pairs), type(source).__name__)}"
    path = cache_dir / REF_CACHE_FILE if cache_dir is not None else None
    if path is not None and path.is_file():
        stored = load_file(str(path))
        if key in stored:
            return stored[key]
    if use_lora:
        with disable_adapter(model):
            ref = compute_reference_logps(model, source, batch_size)
    else:
        ref = compute_reference_logps(model, source, batch_size)
    if path is not None:
        stored = load_file(str(path)) if path.is_file() else {}
        stored[key] = ref.contiguous()
        atomic_write_file(path, lambda tmp: save_file(stored, str(tmp)))
    return ref


# --------------------------------------------------------------------------------------- losses
def make_offline_loss(cfg: AlignConfig):
    """``loss_fn(model, batch) -> LossOutput`` for ``cfg.loss``: per-pair (or per-example) loss sum, weight =
    number of pairs (examples), plus logging metrics. What the objective needs (a reference, pairs or
    unpaired examples) is what it declares in :data:`llmlab.losses.PREFERENCE_OBJECTIVES`."""
    objective = PREFERENCE_OBJECTIVES[cfg.loss]
    options = PreferenceOptions(
        beta=cfg.beta_value,
        label_smoothing=cfg.label_smoothing,
        dpop_lambda=cfg.dpop_lambda,
        simpo_gamma=cfg.simpo_gamma,
        kto_desirable_weight=cfg.kto_desirable_weight,
        kto_undesirable_weight=cfg.kto_undesirable_weight,
    )

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        sums, counts = sequence_logps(model, batch)
        B = sums.shape[0] // 2
        ref = None if objective.reference_free else batch["ref_logps"]
        pairs = PreferenceBatch(
            sums[:B],
            sums[B:],
            counts[:B],
            counts[B:],
            ref_chosen=None if ref is None else ref[:B],
            ref_rejected=None if ref is None else ref[B:],
            desirable=batch.get("desirable"),
        )
        out = objective.compute(pairs, options)
        losses, metrics = out.losses, dict(out.metrics)
        if objective.unpaired:
            return LossOutput(losses.sum(), float(B), metrics)
        if ref is not None:
            if cfg.rpo_alpha:
                # DPO lowers both responses' likelihoods; an NLL term on the chosen one stops the chosen answer
                # itself from becoming unlikely (Pang et al. 2024, "iterative RPO").
                nll = -pairs.chosen / pairs.chosen_tokens.clamp(min=1)
                losses = losses + cfg.rpo_alpha * nll
                metrics["nll"] = float(nll.detach().mean())
            # Sequence log-ratio to the reference on the data's responses (an offline proxy for the KL).
            gap = (pairs.chosen - pairs.ref_chosen) + (pairs.rejected - pairs.ref_rejected)
            metrics["logratio_ref"] = float(gap.detach().mean() / 2)
        metrics.update(preference_metrics(out.rewards_chosen, out.rewards_rejected))
        return LossOutput(losses.sum(), float(B), metrics)

    return loss_fn


def make_offline_eval(cfg: AlignConfig, source: PairSource):
    """Held-out loss, implicit-reward accuracy and margins (``source`` has its reference cache filled)."""
    loss_fn = make_offline_loss(cfg)

    def eval_fn(model: nn.Module) -> dict[str, float]:
        return evaluate_loss(model, source.iterate(cfg.eval_batch_size), loss_fn)

    return eval_fn


# ------------------------------------------------------------------------------------------ runner
def build_sources(
    cfg: AlignConfig, tokenizer: Any, stats: DataStats, model: nn.Module | None = None
) -> tuple[PairSource, PairSource]:
    pairs = gather_pairs(
        cfg.data, model, tokenizer, stats, cfg.skip_invalid, cfg.max_pairs, cfg.onpolicy, cfg.train.seed
    )
    if cfg.heldout is not None:
        train_pairs = pairs
        held_pairs = load_pairs(cfg.heldout, cfg.skip_invalid, stats, cfg.n_heldout)
    else:
        train_pairs, held_pairs = split_pairs(pairs, min(cfg.n_heldout, len(pairs) // 5), seed=cfg.train.seed)
    enc_train = encode_pairs(tokenizer, train_pairs, cfg.max_len, cfg.skip_invalid, stats)
    enc_held = encode_pairs(tokenizer, held_pairs, cfg.max_len, cfg.skip_invalid, stats)
    kind = UnpairedSource if cfg.loss == "kto" else PairSource
    pad = tokenizer.pad_id
    return (
        kind(enc_train, cfg.train.batch_size, pad, seed=cfg.train.seed),
        kind(enc_held, cfg.train.batch_size, pad, seed=cfg.train.seed),
    )


def attach_reference(
    cfg: AlignConfig, model: nn.Module, tokenizer: Any, sources: list[PairSource], cache_dir: Path | None
) -> None:
    """Fill every source's reference cache (skipped for reference-free losses)."""
    if cfg.loss in REFERENCE_FREE:
        return
    if cfg.ref is not None:
        ref_model, ref_tok = load_policy(cfg.ref, cfg.train.device)
        check_same_tokenizer(tokenizer, ref_tok, f"reference {cfg.ref}")
        ref_model.to(next(model.parameters()).device)
        for i, s in enumerate(sources):
            s.ref_logps = cached_reference(
                ref_model, s, cache_dir, f"ref{i}-{cfg.ref}", cfg.eval_batch_size, False
            )
        del ref_model
        return
    for i, s in enumerate(sources):
        s.ref_logps = cached_reference(
            model, s, cache_dir, f"ref{i}-{cfg.model}", cfg.eval_batch_size, cfg.use_lora
        )


def run_offline(
    cfg: AlignConfig, out_dir: str | Path | None = None, model=None, tokenizer=None, resume: bool = False
) -> dict[str, Any]:
    """The whole ``llmlab align`` run; returns the final metrics (plus data statistics), also written to
    ``OUT/align_report.json``. With ``rounds`` > 1 the last round's metrics, and ``rounds_summary``: each
    round's pair statistics and held-out metrics. ``resume`` continues each round from its directory's latest
    checkpoint (a finished round's last checkpoint ends it at once)."""
    cfg.validate()
    if model is None:
        model, tokenizer = load_policy(cfg.model, cfg.train.device)
    out = Path(out_dir) if out_dir is not None else None
    prepare_policy(model, cfg.use_lora, cfg.lora, frozen_reference=False)  # its reference is cached
    summary: list[dict[str, Any]] = []
    for r in range(cfg.rounds):
        round_cfg = cfg
        if cfg.rounds > 1:  # a fresh sample of prompts and batches each round
            round_cfg = dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + r)
            )
        last = r == cfg.rounds - 1
        round_out = out if out is None or last else out / f"round-{r + 1}"
        metrics = _train_round(round_cfg, round_out, model, tokenizer, resume)
        summary.append({"round": r + 1, **{k: metrics[k] for k in ROUND_SUMMARY_KEYS if k in metrics}})
    if cfg.rounds > 1:
        metrics["rounds_summary"] = summary
    if out is not None:
        write_report(out / REPORT_FILE, metrics)
    return metrics


def _train_round(
    cfg: AlignConfig, out: Path | None, model: nn.Module, tokenizer: Any, resume: bool = False
) -> dict[str, Any]:
    """One round: pairs (sampled from ``model`` now, for onpolicy: sources), the reference cache (``model`` as
    it is now, or ``cfg.ref``), then ``cfg.train.max_steps`` Trainer steps on ``model``."""
    stats = DataStats()
    train_src, held_src = build_sources(cfg, tokenizer, stats, model)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    attach_reference(cfg, model, tokenizer, [train_src, held_src], out)
    eval_fn = make_offline_eval(cfg, held_src)
    trainer = Trainer(
        model,
        cfg.train,
        train_src,
        loss_fn=make_offline_loss(cfg),
        eval_fn=eval_fn,
        tokenizer=tokenizer,
        out_dir=out,
        extra_config={"align": config_dict(cfg)},
    )
    if resume:
        trainer.resume()
    metrics = trainer.fit()
    if cfg.use_lora and out is not None:
        save_policy(model, tokenizer, out / "adapter", adapter=True, base=cfg.model)
    metrics = dict(metrics)
    metrics.update(
        {
            "pairs_train": len(train_src.pairs),
            "pairs_heldout": len(held_src.pairs),
            "skipped_invalid": stats.skipped_invalid,
            "truncated": stats.truncated,
            **stats.extra,
        }
    )
    return metrics
