"""Run the pipeline's stages in order, resumably.

Each finished stage leaves a done-marker ``DIR/.pipeline/<stage>.json`` holding the hash of its config
section, the digests of the inputs it was made from (the earlier stages' outputs), the digest of its own
outputs, its wall time and a summary. A rerun skips a stage whose marker matches; it redoes one whose config
changed, whose inputs changed (an earlier stage was redone) or whose outputs are missing or corrupt (their
digest no longer matches), and says which. A stage that was started but not finished with the same
fingerprint resumes from its last checkpoint (pretrain, sft, rm, dpo: the Trainer's ``latest``; grpo, ppo: the
checkpoint of the last saved rollout step); otherwise it starts over in an emptied directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmlab.errors import ConfigError
from llmlab.pipeline.config import MODEL_STAGES, STAGES, PipelineConfig
from llmlab.pipeline.markers import MARKER_DIR, marker_path, read_marker, write_json

# Recipes that continue from their Trainer's `latest` checkpoint (RL: the rollout step's checkpoint).
RESUMABLE = ("pretrain", "sft", "rm", "dpo", "grpo", "ppo")
# Keys that change how a run looks, not what it computes: left out of the stage hash.
COSMETIC_KEYS = {"progress", "tensorboard", "plot", "log_every"}
# Rough seconds per stage on the 2-core CPU (the overall line's estimate before any stage has run here).
EXPECTED_SECONDS = {
    "tokenizer": 10, "data": 15, "pretrain": 200, "sft": 250, "rm": 30, "dpo": 60, "grpo": 120,
    "ppo": 150, "quantize": 5, "eval": 30, "report": 15,
}  # fmt: skip


@dataclasses.dataclass
class Step:
    stage: str
    action: str  # "skip" | "run"
    reason: str


# ------------------------------------------------------------------------------------- the graph
def stage_inputs(cfg: PipelineConfig, stage: str) -> list[str]:
    """The stages whose outputs ``stage`` reads (only those this pipeline runs)."""
    from llmlab.pipeline.stages import last_policy_stage

    rl_source = cfg.rl_from if cfg.rl_from in cfg.stages else "sft"
    deps = {
        "tokenizer": [],
        "data": ["tokenizer"],
        "pretrain": ["data"],
        "sft": ["pretrain"],
        "rm": ["sft"],
        "dpo": ["sft"],
        "grpo": [rl_source],
        "ppo": [rl_source, "rm"],
        "quantize": [last_policy_stage(cfg) or ""],
        "eval": [s for s in (*MODEL_STAGES, "rm", "quantize", "data") if s in cfg.stages],
        "report": [s for s in (*MODEL_STAGES, "eval") if s in cfg.stages],
    }[stage]
    return [d for d in deps if d and d != stage and d in cfg.stages]


def stage_outputs(cfg: PipelineConfig, root: Path, stage: str) -> list[Path]:
    """What a finished stage leaves (digested into its marker; a mismatch later means corrupt)."""
    out = root / stage
    if stage in (*MODEL_STAGES, "rm"):
        return [out / "final"]
    return {
        "tokenizer": [out / "tokenizer.json"],
        "data": [out / "meta.json", out / "train.bin", out / "val.bin"],
        "quantize": [out / s for s in cfg.quantize.schemes],
        "eval": [out / "metrics.json"],
        "report": [out / "index.html", out / "report.md", out / "metrics.json"],
    }[stage]


def section_config(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The part of the config a stage's result depends on (links between stages are inputs, not config)."""
    from llmlab.config import to_dict

    name = {"tokenizer": "data", "data": "data"}.get(stage, stage)
    section = to_dict(getattr(cfg, name)) if hasattr(cfg, name) else {}
    drop = {"pretrain": ["data"], "sft": ["base"], "rm": ["model"], "dpo": ["model"], "grpo": ["model"]}
    for key in (*drop.get(stage, []), "model" if stage == "ppo" else "", "reward_model"):
        section.pop(key, None)
    if stage in ("grpo", "ppo"):
        section["rl_from"] = cfg.rl_from
    if stage == "sft":
        section["base"] = cfg.base
    return json.loads(json.dumps(_strip_cosmetic(section), default=str))  # as a marker stores it


def _strip_cosmetic(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_cosmetic(v) for k, v in obj.items() if k not in COSMETIC_KEYS}
    return obj


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def digest(paths: list[Path]) -> str | None:
    """sha256 over every file of ``paths`` (directories recursively), or None when one is missing."""
    h = hashlib.sha256()
    for path in paths:
        if not path.exists():
            return None
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if path.is_dir() and not files:
            return None
        for f in files:
            h.update(str(f.relative_to(path.parent)).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def fingerprint(cfg: PipelineConfig, root: Path, stage: str) -> dict[str, Any]:
    inputs = {}
    for dep in stage_inputs(cfg, stage):
        marker = read_marker(root, dep)
        inputs[dep] = marker.get("digest") if marker else None
    return {"config_hash": _hash(section_config(cfg, stage)), "inputs": inputs}


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every differing leaf of two config dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a} -> {b}")
    return changes


def stale_reason(cfg: PipelineConfig, root: Path, stage: str) -> str | None:
    """Why a stage's recorded result can't be reused, or None when it can."""
    marker = read_marker(root, stage)
    if marker is None:
        return "not done yet"
    now = fingerprint(cfg, root, stage)
    if marker.get("config_hash") != now["config_hash"]:
        section = stage if stage not in ("tokenizer", "data") else "data"
        changes = config_changes(marker.get("config", {}), section_config(cfg, stage), f"{section}.")
        return f"config changed ({'; '.join(changes[:4]) or 'see the config'})"
    for dep, dig in now["inputs"].items():
        if marker.get("inputs", {}).get(dep) != dig:
            return f"its input from stage '{dep}' changed"
    if digest(stage_outputs(cfg, root, stage)) != marker.get("digest"):
        return "its output is missing or corrupt"
    return None


# ------------------------------------------------------------------------------------- the plan
def plan(
    cfg: PipelineConfig, root: Path, from_stage: str | None = None, only: str | None = None
) -> list[Step]:
    """What to run and what to skip, with the reason for each stage that runs."""
    for name, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGES:
            raise ConfigError(f"{name}: unknown stage '{value}' (stages: {', '.join(STAGES)})")
        if value is not None and value not in cfg.stages:
            raise ConfigError(
                f"{name}: stage '{value}' is not in this pipeline (stages: {', '.join(cfg.stages)})"
            )
    if only is not None:
        for dep in stage_inputs(cfg, only):
            if read_marker(root, dep) is None or stale_reason(cfg, root, dep) is not None:
                raise ConfigError(
                    f"--only {only}: its input from stage '{dep}' ({root / dep}) is not done; run "
                    f"`llmlab pipeline --out {root} --only {dep}` (same preset and overrides) or run without --only"
                )
        return [Step(only, "run", "--only")]
    steps: list[Step] = []
    redone: set[str] = set()
    forced = STAGES.index(from_stage) if from_stage else len(STAGES)
    for stage in cfg.stages:
        upstream = [d for d in stage_inputs(cfg, stage) if d in redone]
        if STAGES.index(stage) >= forced:
            reason: str | None = f"--from {from_stage}"
        elif upstream and read_marker(root, stage) is not None:  # a first run is "not done yet", not "redone"
            reason = f"after stage '{upstream[0]}', which is redone"
        else:
            reason = stale_reason(cfg, root, stage)
        if reason is None:
            steps.append(Step(stage, "skip", "done"))
        else:
            steps.append(Step(stage, "run", reason))
            redone.add(stage)
    return steps


def describe_plan(steps: list[Step]) -> list[str]:
    """A line for each stage redone because its config changed or its output is corrupt, naming the later
    stages redone with it."""
    lines = []
    for i, step in enumerate(steps):
        if step.action == "run" and (step.reason.startswith("config changed") or "corrupt" in step.reason):
            later = [s.stage for s in steps[i + 1 :] if s.action == "run"]
            tail = f" and the stages after it ({', '.join(later)})" if later else ""
            lines.append(f"{step.stage}: {step.reason}: redoing {step.stage}{tail}")
    return lines


# --------------------------------------------------------------------------------------- running
def _fmt(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def stage_function(stage: str) -> Callable[..., dict[str, Any]]:
    if stage == "eval":
        from llmlab.pipeline.evaluation import run_eval

        return run_eval
    if stage == "report":
        from llmlab.pipeline.report import run_report

        return run_report
    from llmlab.pipeline.stages import STAGE_FUNCTIONS

    return STAGE_FUNCTIONS[stage]


def run_pipeline(
    cfg: PipelineConfig,
    root: str | Path,
    from_stage: str | None = None,
    only: str | None = None,
    preset: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the pipeline into ``root``; returns ``{stage: {"action", "reason", "seconds", ...}}``."""
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / MARKER_DIR / "pipeline_config.json", {"preset": preset, **dataclasses.asdict(cfg)})
    steps = plan(cfg, root, from_stage, only)
    for line in describe_plan(steps):
        echo(f"[pipeline] {line}")
    todo = [s for s in steps if s.action == "run"]
    expected = {s.stage: _expected(root, s.stage) for s in todo}
    t_start, done_expected, results = time.perf_counter(), 0.0, {}
    for k, step in enumerate(steps, 1):
        if step.action == "skip":
            results[step.stage] = {"action": "skip", "reason": "done"}
            echo(f"[pipeline] stage {k}/{len(steps)} {step.stage}: done before, skipped")
            continue
        elapsed = time.perf_counter() - t_start
        # Scale the estimate by this machine's pace once a minute of expected work is done (a few seconds of
        # tokenizer say little about the rest).
        speed = elapsed / done_expected if done_expected >= 60 else 1.0
        left = speed * sum(expected[s.stage] for s in todo if steps.index(s) >= k - 1)
        echo(
            f"[pipeline] stage {k}/{len(steps)} {step.stage} ({step.reason}) | elapsed {_fmt(elapsed)} | "
            f"estimated {_fmt(left)} left"
        )
        results[step.stage] = run_stage(cfg, root, step.stage, echo)
        done_expected += expected[step.stage]
    results["_elapsed_s"] = time.perf_counter() - t_start
    return results


def _expected(root: Path, stage: str) -> float:
    marker = read_marker(root, stage)  # an earlier run of this stage here knows best
    return float(marker["seconds"]) if marker and marker.get("seconds") else float(EXPECTED_SECONDS[stage])


def run_stage(cfg: PipelineConfig, root: Path, stage: str, echo: Callable[[str], None]) -> dict[str, Any]:
    """Run one stage: resume it when a killed run of the same fingerprint left a checkpoint, else start it
    in an emptied directory; write its done-marker."""
    out = root / stage
    now = fingerprint(cfg, root, stage)
    started = read_marker(root, stage, started=True)
    resume = stage in RESUMABLE and started is not None and started.get("fingerprint") == now and out.exists()
    marker_path(root, stage).unlink(missing_ok=True)  # the old result is no longer valid
    if resume:
        echo(f"[pipeline] {stage}: resuming the interrupted run from its last checkpoint")
    elif out.exists():
        shutil.rmtree(out)
    if stage != "data":  # prepare_dataset creates (atomically) its own directory
        out.mkdir(parents=True, exist_ok=True)
    write_json(marker_path(root, stage, started=True), {"fingerprint": now})
    t0 = time.perf_counter()
    summary = stage_function(stage)(cfg, root, out, resume)
    seconds = time.perf_counter() - t0
    marker = {
        "stage": stage,
        **now,
        "config": section_config(cfg, stage),
        "digest": digest(stage_outputs(cfg, root, stage)),
        "seconds": seconds,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resumed": resume,
        "summary": summary,
    }
    if marker["digest"] is None:
        raise ConfigError(f"stage '{stage}' finished without writing {stage_outputs(cfg, root, stage)[0]}")
    write_json(marker_path(root, stage), marker)
    marker_path(root, stage, started=True).unlink(missing_ok=True)
    echo(f"[pipeline] {stage}: done in {_fmt(seconds)}")
    return {"action": "run", "seconds": seconds, "summary": summary}
