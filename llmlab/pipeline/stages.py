"""The pipeline's stages, each a call into the existing recipe (no second training loop).

This is the one module of ``llmlab.pipeline`` that imports the stage recipes (the pipeline is an orchestrator
above them); every other pipeline module takes recipe names from here. Each ``run_<stage>(cfg, root, out,
resume)`` reads its inputs from the earlier stages' directories under ``root``, writes into ``out`` and returns
a small JSON-able summary (kept in the stage's done-marker and shown by the report).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmlab.errors import ConfigError
from llmlab.recipes.common import preference_train_config, sft_train_config
from llmlab.recipes.dpo import ALIGN_PRESETS, AlignConfig, run_offline
from llmlab.recipes.grpo import GRPO_PRESETS, GRPOConfig, run_grpo
from llmlab.recipes.ppo import PPO_PRESETS, PPOConfig, run_ppo
from llmlab.recipes.pretrain import PRETRAIN_PRESETS, DataConfig, PretrainConfig, build_trainer
from llmlab.recipes.reward_model import RMConfig, run_reward_model
from llmlab.recipes.sft import SFT_PRESETS, SFTConfig, run_sft

# A llmlab.pipeline.config.PipelineConfig; not imported, since that module takes the recipe configs from here.
PipelineConfig = Any

__all__ = [
    "ALIGN_PRESETS",
    "GRPO_PRESETS",
    "PPO_PRESETS",
    "PRETRAIN_PRESETS",
    "SFT_PRESETS",
    "AlignConfig",
    "DataConfig",
    "GRPOConfig",
    "PPOConfig",
    "PretrainConfig",
    "RMConfig",
    "SFTConfig",
    "preference_train_config",
    "sft_train_config",
]

FINAL = "final"


def final_dir(root: Path, stage: str) -> Path:
    return root / stage / FINAL


def policy_source(cfg: PipelineConfig, root: Path, stage: str) -> str:
    """The model a stage starts from: the previous policy stage's ``final`` (or ``cfg.base``)."""
    if stage == "sft":
        return str(final_dir(root, "pretrain")) if not cfg.base else cfg.base
    if stage in ("rm", "dpo"):
        return str(final_dir(root, "sft"))
    if stage in ("grpo", "ppo"):
        source = cfg.rl_from if cfg.rl_from in cfg.stages else "sft"
        return str(final_dir(root, source))
    raise ConfigError(f"stage '{stage}' starts from no policy")


# --------------------------------------------------------------------------------- text stages
def _clean_docs(cfg: PipelineConfig) -> tuple[list[Any], Any]:
    from llmlab.config import build_config
    from llmlab.data.clean import CLEAN_PRESETS, CleanConfig, clean_documents
    from llmlab.data.corpora import Document, load_documents

    docs = load_documents(cfg.data.corpus)
    clean_cfg = build_config(CleanConfig, CLEAN_PRESETS, cfg.data.clean)
    result = clean_documents([d.text for d in docs], clean_cfg)
    return [Document(t, docs[i].source) for t, i in zip(result.texts, result.index)], result.report


def run_tokenizer(cfg: PipelineConfig, root: Path, out: Path, resume: bool) -> dict[str, Any]:
    """A byte-level BPE on the cleaned *training* documents (the held-out split never shapes the vocabulary)."""
    from llmlab.data.corpora import split_documents
    from llmlab.tokenizer.train import tokenizer_stats, train_tokenizer

    docs, _ = _clean_docs(cfg)
    train_idx, val_idx = split_documents(docs, cfg.data.val_fraction, cfg.data.seed)
    tok = train_tokenizer((docs[i].text for i in train_idx), cfg.data.vocab_size, length=len(train_idx))
    tok.save(out)
    stats = tokenizer_stats(tok, [docs[i].text for i in val_idx])
    return {"vocab_size": tok.vocab_size, "train_documents": len(train_idx), **stats}


def run_data(cfg: PipelineConfig, root: Path, out: Path, resume: bool) -> dict[str, Any]:
    """Clean (with its report), split by document and tokenize into shards with the tokenizer stage's BPE."""
    from llmlab.config import build_config
    from llmlab.data.clean import CLEAN_PRESETS, CleanConfig
    from llmlab.data.corpora import load_documents
    from llmlab.data.prepare import prepare_dataset
    from llmlab.tokenizer import Tokenizer

    tok = Tokenizer.from_file(root / "tokenizer")
    meta = prepare_dataset(
        load_documents(cfg.data.corpus),
        tok,
        out,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.data.seed,
        clean=build_config(CleanConfig, CLEAN_PRESETS, cfg.data.clean),
    )
    report = meta.pop("cleaning_report", None)
    cleaning = report.to_dict() if hasattr(report, "to_dict") else None
    return {"splits": meta["splits"], "compression": meta.get("compression"), "cleaning": cleaning}


# ------------------------------------------------------------------------------- model stages
def pretrain_config(cfg: PipelineConfig, root: Path) -> PretrainConfig:
    pre = copy.deepcopy(cfg.pretrain)
    pre.data = copy.deepcopy(cfg.data)
    pre.data.dir = str(root / "data")
    return pre


def run_pretrain(cfg: PipelineConfig, root: Path, out: Path, resume: bool) -> dict[str, Any]:
    """The pretrain recipe's Trainer; ``init/`` keeps the weights before training (for the analysis)."""
    import torch

    from llmlab.data.loader import iterate_split, read_meta
    from llmlab.model.checkpoint import save_checkpoint
    from llmlab.train.evaluation import make_eval_fn

    pre = pretrain_config(cfg, root)
    trainer, data_dir = build_trainer(pre, out)
    if not (resume and trainer.resume()):
        save_checkpoint(out / "init", trainer.model, trainer.tokenizer)
    t0, tokens0 = time.perf_counter(), trainer.tokens_seen
    metrics = trainer.fit()
    seconds = time.perf_counter() - t0
    meta = read_meta(data_dir)
    va = meta["splits"]["val"]
    full_val = make_eval_fn(
        lambda: iterate_split(data_dir, "val", pre.train.seq_len, 16),
        bytes_per_token=va["bytes"] / va["tokens"],
    )
    trainer.model.eval()
    with torch.no_grad(), trainer.autocast():
        val = full_val(trainer.model)
    baselines = meta.get("compression", {}).get("val", {})
    return {
        "steps": trainer.step,
        "train_seconds": seconds,
        "tokens_seen": trainer.tokens_seen,
        "tokens_per_s": (trainer.tokens_seen - tokens0) / max(seconds, 1e-9),
        "mfu": metrics.get("mfu"),
        "val_bpb": val.get("bpb"),
        "val_loss": val.get("loss"),
        "compressors_bpb": baselines,
        "beats_compressors": bool(baselines) and val.get("bpb", 9.9) < min(baselines.values()),
    }


def _merged_final(out: Path, base: str, adapter: Path) -> None:
    """A LoRA stage's policy as a plain checkpoint at ``out/final`` (adapter folded into the base)."""
    from llmlab.loading import load
    from llmlab.model.checkpoint import save_checkpoint
    from llmlab.model.lora import merge_and_unload

    model, tok = load(base, adapter=adapter)
    save_checkpoint(out / FINAL, merge_and_unload(model), tok)


def run_sft_stage(cfg: PipelineConfig, root: Path, out: Path, resume: bool) -> dict[str, Any]:
    sft = copy.deepcopy(cfg.sft)
    sft.base = policy_source(cfg, root, "sft")
    report = run_sft(sft, out, resume=resume)
    if sft.peft != "none":
        _merged_final(out, sft.base, out)
    return {k: report.get(k) for k in ("examples", "train", "before", "after", "general_loss_rise_pct")}


def run_rm(cfg: PipelineConfig, root: Path, out: Path, resume: bool) -> dict[str, Any]:
    rm = copy.deepcopy(cfg.rm)
    rm.model = policy_source(cfg, root, "rm")
    return run_reward_model(rm, out, resume=resume)


def _policy_stage(
    cfg: PipelineConfig, root: Path, out: Path, stage: str, run: Callable[[Any], dict[str, Any]]
) -> dict[str, Any]:
    """DPO, GRPO and PPO alike: the stage's config starts from the previous policy, the recipe runs, and a
    LoRA run's adapter is folded into ``out/final`` so every stage's model loads the same way."""
    section = copy.deepcopy(getattr(cfg, stage))
    section.model = policy_source(cfg, root, stage)
    if stage == "ppo":  # PPO is scored by the pipeline's own reward model
        section.reward, section.reward_model = "rm", str(final_dir(root, "rm"))
    result = run(section)
    if section.use_lora:
        _merged_final(out, section.model, out / "adapter")
    return result


def run_dpo(cfg: PipelineConfig, root: Path, out: Path, resume: bool) -> dict[str, Any]:
    return _policy_stage(cfg, root, out, "dpo", lambda dpo: run_offline(dpo, out, resume=resume))


def run_grpo_stage(cfg: PipelineConfig, root: Path, out: Path, resume: bool) -> dict[str, Any]:
    return _policy_stage(
        cfg, root, out, "grpo", lambda grpo: run_grpo(grpo, out, progress=grpo.train.progress, resume=resume)
    )


def run_ppo_stage(cfg: PipelineConfig, root: Path, out: Path, resume: bool) -> dict[str, Any]:
    return _policy_stage(
        cfg, root, out, "ppo", lambda ppo: run_ppo(ppo, out, progress=ppo.train.progress, resume=resume)
    )


def last_policy_stage(cfg: PipelineConfig) -> str | None:
    """The last policy stage of this pipeline (what the quantize stage quantizes)."""
    stages = [s for s in ("pretrain", "sft", "dpo", "grpo", "ppo") if s in cfg.stages]
    return stages[-1] if stages else None


def run_quantize(cfg: PipelineConfig, root: Path, out: Path, resume: bool) -> dict[str, Any]:
    from llmlab.loading import load
    from llmlab.quant.quantize import QuantConfig, linear_bytes, quantize_model, save_quantized

    source = last_policy_stage(cfg)
    if source is None:
        raise ConfigError("stage 'quantize' needs a policy stage before it (pretrain, sft, dpo, grpo or ppo)")
    result: dict[str, Any] = {"source": source}
    for scheme in cfg.quantize.schemes:
        model, tok = load(final_dir(root, source))
        model = model.float()
        before = linear_bytes(model)
        qcfg = QuantConfig(scheme=scheme, group_size=None if scheme == "int8" else cfg.quantize.group_size)
        report = quantize_model(model, qcfg, tokenizer=tok, progress=False)
        save_quantized(out / scheme, model, tok, qcfg)
        result[scheme] = {**report, "linear_bytes_before": before, "linear_bytes_after": linear_bytes(model)}
    return result


STAGE_FUNCTIONS = {
    "tokenizer": run_tokenizer,
    "data": run_data,
    "pretrain": run_pretrain,
    "sft": run_sft_stage,
    "rm": run_rm,
    "dpo": run_dpo,
    "grpo": run_grpo_stage,
    "ppo": run_ppo_stage,
    "quantize": run_quantize,
}
