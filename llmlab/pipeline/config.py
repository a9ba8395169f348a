"""The pipeline's one typed config: every stage's recipe config as a section, plus the stage list.

``PipelineConfig`` nests the recipes' own configs (``pretrain`` is a ``PretrainConfig``, ``sft`` an
``SFTConfig``, ``dpo`` an ``AlignConfig`` ...), so every recipe key works with a section prefix:
``sft.train.max_steps=200``, ``dpo.beta=0.2``, ``grpo.group_size=8``. Presets (``tiny``, ``micro``,
``smollm2``, ``gpu``), then YAML (``--config``), then ``key=value`` overrides, as everywhere in llmlab.

The stages fill in what links them (``sft.base`` is the pretrain stage's model, ``pretrain.data`` is the
pipeline's ``data`` section, ...): a value set there by hand is replaced.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from llmlab.errors import ConfigError
from llmlab.model.config import MODEL_PRESETS, ModelConfig
from llmlab.model.lora import LoRAConfig
from llmlab.pipeline.stages import (
    ALIGN_PRESETS,
    GRPO_PRESETS,
    PPO_PRESETS,
    PRETRAIN_PRESETS,
    SFT_PRESETS,
    AlignConfig,
    DataConfig,
    GRPOConfig,
    PPOConfig,
    PretrainConfig,
    RMConfig,
    SFTConfig,
    preference_train_config,
    sft_train_config,
)
from llmlab.train.config import TrainConfig

# Every stage, in pipeline order. A preset runs a subset (``stages=...``), always in this order.
STAGES = ("tokenizer", "data", "pretrain", "sft", "rm", "dpo", "grpo", "ppo", "quantize", "eval", "report")
# Stages whose output is a policy model at DIR/<stage>/final (llmlab.load reads it).
MODEL_STAGES = ("pretrain", "sft", "dpo", "grpo", "ppo")


@dataclass
class QuantizeStageConfig:
    """Weight-only quantization of the last policy model (``llmlab quantize`` schemes)."""

    schemes: list[str] = field(default_factory=lambda: ["int8", "int4"])
    group_size: int = 64  # int4 group / NF4 block


@dataclass
class EvalStageConfig:
    """What every stage's model is measured on, the same for all of them."""

    task_source: str = "tasks"  # held-out verifiable problems (llmlab.align.rollout.load_problems source)
    n_tasks: int = 180  # held-out problems (spread over the suite's tasks)
    max_new_tokens: int = 24
    text_tokens: int | None = None  # held-out text for bits per byte; None: the whole val split
    text_corpus: str = "auto"  # auto: the data stage's val split (or wikitext2-test without a data stage)
    winrate_baseline: str = "sft"  # win rate of every later stage against this stage's model
    harness_tasks: list[str] = field(default_factory=lambda: ["task_suite"])  # llmlab.eval.evaluate tasks
    harness_limit: int | None = None  # records per harness task (None: all; task_suite has 180)
    sample_prompts: list[str] = field(
        default_factory=lambda: [
            "Count the words in this text: apple river stone? Answer with the number only.",
            "Reverse the letters: k d a. Answer with the reversed letters, separated by spaces.",
            "What is 12 + 7? Answer with the number only.",
            "Once upon a time",
        ]
    )


@dataclass
class ReportStageConfig:
    analysis: bool = True  # llmlab analyze for each pair of consecutive model stages
    analysis_prompts: int = 8  # keyword prompts for the attention analysis


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    base: str = ""  # start from this model instead of pretraining (e.g. smollm2); pretrain is then skipped
    rl_from: str = "dpo"  # the stage GRPO/PPO start from (dpo or sft)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: AlignConfig = field(default_factory=AlignConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(reward_model="DIR/rm/final"))
    quantize: QuantizeStageConfig = field(default_factory=QuantizeStageConfig)
    eval: EvalStageConfig = field(default_factory=EvalStageConfig)
    report: ReportStageConfig = field(default_factory=ReportStageConfig)

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(
                f"config key 'stages': unknown stage '{unknown[0]}' (stages: {', '.join(STAGES)})"
            )
        self.stages = [s for s in STAGES if s in self.stages]
        if self.rl_from not in ("sft", "dpo"):
            raise ConfigError(f"config key 'rl_from' must be 'sft' or 'dpo', got {self.rl_from!r}")
        if self.base and "pretrain" in self.stages:
            raise ConfigError("config key 'base' replaces the pretrain stage: drop 'pretrain' from 'stages'")
        if "ppo" in self.stages and "rm" not in self.stages:
            raise ConfigError("stage 'ppo' scores rollouts with the reward model: add 'rm' to 'stages'")


# ------------------------------------------------------------------------------------------ presets
def _tiny() -> PipelineConfig:
    """The demo: every stage on the 4M-parameter model, sized for ~15 minutes on a 2-core CPU."""
    pre = copy.deepcopy(PRETRAIN_PRESETS["tiny"])
    pre.model.dropout = 0.1
    pre.train = TrainConfig(
        **{
            **vars(pre.train),
            "max_steps": 400,  # 150 steps already beat gzip/xz (1.38 vs 2.34 bits/byte); SFT needs the time more
            "warmup_steps": 40,
            "lr": 2e-3,
            "min_lr": 1e-4,
            "eval_every": 125,
            "save_every": 125,
            "eval_batches": 8,
        }
    )
    sft = SFTConfig(
        data="tasks",
        max_len=128,
        task_examples=30_000,
        dedup=False,
        dropout=0.0,
        replay_fraction=0.2,
        replay_loss="kd",
        task_eval_per_task=0,  # the eval stage measures every model the same way
        train=sft_train_config(
            lr=1e-3,
            max_steps=800,
            warmup_steps=30,
            batch_size=16,
            seq_len=128,
            eval_every=200,
            save_every=200,
        ),
    )
    rm = RMConfig(
        data=["tasks"],
        heldout=None,
        n_heldout=100,
        max_pairs=2000,
        max_len=128,
        train=preference_train_config(
            lr=5e-5,
            min_lr=5e-6,
            warmup_steps=10,
            max_steps=120,
            batch_size=16,
            eval_every=60,
            save_every=60,
            log_every=10,
        ),
    )
    dpo = copy.deepcopy(ALIGN_PRESETS["tiny-dpo"])
    dpo.rounds = 1
    dpo.onpolicy.prompts = 600
    dpo.train.max_steps = 120
    dpo.train.save_every = 60  # a killed stage resumes from here (the pipeline's mid-stage resume)
    dpo.train.log_every = 10
    grpo = copy.deepcopy(GRPO_PRESETS["tiny-grpo"])
    grpo.n_eval = 90
    grpo.train.max_steps = 60
    grpo.train.save_every = 20
    grpo.train.log_every = 5
    ppo = copy.deepcopy(PPO_PRESETS["tiny-ppo"])
    ppo.reward_model = "DIR/rm/final"  # the stage sets the real path
    return PipelineConfig(
        stages=[s for s in STAGES if s != "ppo"],
        data=DataConfig(corpus="tinystories", vocab_size=4096),
        pretrain=pre,
        sft=sft,
        rm=rm,
        dpo=dpo,
        grpo=grpo,
        ppo=ppo,
    )


def _micro() -> PipelineConfig:
    """Seconds per stage: the test suite's end-to-end run (nothing here is expected to learn)."""
    cfg = _tiny()
    cfg.stages = list(STAGES)
    cfg.data = DataConfig(corpus="tinyshakespeare", vocab_size=320)
    cfg.pretrain.model = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=2, max_seq_len=128)
    small = dict(
        peak_tflops=1.0,
        warmup_steps=1,
        eval_every=0,
        save_every=5,
        eval_batches=2,
        log_every=2,
        progress=False,
        tensorboard=False,
    )
    cfg.pretrain.train = TrainConfig(
        **{**vars(cfg.pretrain.train), **small, "max_steps": 10, "batch_size": 4}
    )
    cfg.pretrain.train.seq_len = 64
    cfg.sft.task_examples = 400
    cfg.sft.max_len = 64
    cfg.sft.general_eval_tokens = 512
    cfg.sft.train = sft_train_config(
        **{**small, "max_steps": 6, "batch_size": 4, "seq_len": 64, "save_every": 3}
    )
    pref = dict(
        peak_tflops=1.0, max_steps=3, batch_size=4, warmup_steps=0, eval_every=0, log_every=1, progress=False
    )
    cfg.rm.max_pairs, cfg.rm.n_heldout, cfg.rm.max_len, cfg.rm.skip_invalid = 64, 8, 128, True
    cfg.rm.train = preference_train_config(**pref)
    cfg.dpo.data, cfg.dpo.rounds, cfg.dpo.max_pairs, cfg.dpo.n_heldout = ["tasks"], 1, 48, 8
    cfg.dpo.max_len, cfg.dpo.skip_invalid = 128, True
    cfg.dpo.train = preference_train_config(**pref)
    cfg.grpo.n_train, cfg.grpo.n_eval, cfg.grpo.group_size, cfg.grpo.prompts_per_step = 20, 6, 2, 2
    cfg.grpo.max_new_tokens, cfg.grpo.micro_batch = 8, 4
    cfg.grpo.train = preference_train_config(
        **{**pref, "max_steps": 2, "save_every": 1, "schedule": "constant"}
    )
    cfg.ppo.n_train, cfg.ppo.n_eval, cfg.ppo.prompts_per_step, cfg.ppo.eval_samples = 20, 6, 4, 1
    cfg.ppo.max_new_tokens, cfg.ppo.minibatch, cfg.ppo.micro_batch, cfg.ppo.ppo_epochs = 8, 4, 4, 1
    cfg.ppo.train = preference_train_config(**{**pref, "max_steps": 2, "schedule": "constant"})
    # One quantized copy to evaluate: the group-wise scheme (int8 is one scale per channel).
    cfg.quantize.schemes = ["int4"]
    cfg.quantize.group_size = 32
    cfg.eval.n_tasks, cfg.eval.max_new_tokens, cfg.eval.text_tokens, cfg.eval.harness_limit = 9, 8, 2048, 9
    cfg.eval.sample_prompts = cfg.eval.sample_prompts[:2]
    cfg.report.analysis_prompts = 2
    return cfg


def _smollm2() -> PipelineConfig:
    """The post-training half on the real SmolLM2-135M-Instruct: LoRA SFT on shipped Alpaca data, LoRA DPO on
    hh-rlhf pairs, eval, int8/int4 quantization and the report (CPU)."""
    sft = copy.deepcopy(SFT_PRESETS["smollm2-lora"])
    sft.train.max_steps = 40
    sft.task_eval_per_task = 0
    dpo = copy.deepcopy(ALIGN_PRESETS["smollm2-dpo-lora"])
    dpo.max_pairs, dpo.n_heldout = 400, 64
    dpo.train.max_steps = 40
    return PipelineConfig(
        stages=["sft", "dpo", "quantize", "eval", "report"],
        base="smollm2",
        sft=sft,
        dpo=dpo,
        eval=EvalStageConfig(n_tasks=90, text_corpus="wikitext2-test", text_tokens=8192),
        report=ReportStageConfig(analysis_prompts=4),
    )


def _gpu() -> PipelineConfig:
    """A GPT-2-124M-class run of every stage for one CUDA GPU (see README for its expected time)."""
    cfg = _tiny()
    cfg.stages = list(STAGES)
    cfg.data = DataConfig(corpus="gutenberg", vocab_size=32768)
    cfg.pretrain = copy.deepcopy(PRETRAIN_PRESETS["gpt2-124m"])
    cfg.pretrain.model = copy.deepcopy(MODEL_PRESETS["gpt2-124m"])
    cfg.pretrain.train.max_steps, cfg.pretrain.train.grad_accum_steps = 5000, 4
    cfg.pretrain.train.save_every = 500
    cfg.sft = copy.deepcopy(SFT_PRESETS["tiny-tasks-full"])
    cfg.sft.task_eval_per_task = 0
    cfg.sft.train.save_every = 500
    cfg.rm.train.max_steps, cfg.rm.train.batch_size = 400, 32
    cfg.dpo = copy.deepcopy(ALIGN_PRESETS["tiny-dpo"])
    cfg.grpo = copy.deepcopy(GRPO_PRESETS["tiny-grpo"])
    cfg.quantize.schemes = ["int8", "int4", "nf4"]
    cfg.eval.n_tasks = 450
    cfg.dpo.use_lora = False
    cfg.sft.lora = LoRAConfig()
    return cfg


PIPELINE_PRESETS: dict[str, PipelineConfig] = {
    "tiny": _tiny(),
    "micro": _micro(),
    "smollm2": _smollm2(),
    "gpu": _gpu(),
}


def load_pipeline_config(
    preset: str | None, yaml_path: str | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Preset (default ``tiny``), then YAML, then ``section.key=value`` overrides; validated."""
    from llmlab.config import build_config

    return build_config(PipelineConfig, PIPELINE_PRESETS, preset or "tiny", yaml_path, overrides or [])
