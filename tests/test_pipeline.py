"""``llmlab pipeline`` end to end on the micro preset (seconds per stage): outputs, skip, invalidation,
corrupt outputs, mid-stage resume and the bad-input messages."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmlab.cli import main
from llmlab.errors import ConfigError
from llmlab.pipeline.config import MODEL_STAGES, load_pipeline_config
from llmlab.pipeline.markers import marker_path
from llmlab.pipeline.runner import plan, run_pipeline
from llmlab.train.state import ckpt_name, write_latest


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    from llmlab.data.corpora import load_corpus

    base = tmp_path_factory.mktemp("pipeline")
    corpus = base / "corpus.txt"  # ~150 kB of the bundled Shakespeare: the same stages, a quarter of the time
    corpus.write_text("\n\n".join(load_corpus("tinyshakespeare"))[:150_000], encoding="utf-8")
    root = base / "run"
    cfg = load_pipeline_config("micro", overrides=[f"data.corpus={corpus}"])
    lines: list[str] = []
    results = run_pipeline(cfg, root, preset="micro", echo=lines.append)
    return cfg, root, results, lines


def test_every_stage_runs_and_leaves_its_interface(micro_run):
    import llmlab

    cfg, root, results, _ = micro_run
    assert [s for s in cfg.stages if results[s]["action"] == "run"] == cfg.stages
    for stage in MODEL_STAGES:
        model, tok = llmlab.load(root / stage / "final")
        assert tok is not None and model.cfg.vocab_size == tok.vocab_size
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    assert set(metrics) == {*MODEL_STAGES, "quantize-int4"}
    for stage, res in metrics.items():  # the evaluation harness's shape, per stage
        assert set(res) == {"results", "config"}
        assert 0.0 <= res["results"]["tasks"]["exact_match"] <= 1.0
        assert res["results"]["heldout_text"]["bits_per_byte"] > 0
        if stage not in ("pretrain", "sft"):
            w = res["results"]["winrate_vs_sft"]
            assert w["ci_low"] <= w["win_rate"] <= w["ci_high"]
    assert (root / "report" / "index.html").stat().st_size > 10_000
    assert "## Stage analysis" in (root / "report" / "report.md").read_text()
    analysis = json.loads((root / "report" / "analysis" / "pretrain-to-sft" / "analysis.json").read_text())
    assert analysis["param_delta"]["q"]["0"] > 0  # SFT is full fine-tuning: every block moved


def test_rerun_skips_every_finished_stage(micro_run):
    cfg, root, _, _ = micro_run
    lines: list[str] = []
    results = run_pipeline(cfg, root, echo=lines.append)
    assert all(results[s]["action"] == "skip" for s in cfg.stages)
    assert any("stage 3/11 pretrain: done before, skipped" in line for line in lines)


def test_changed_config_invalidates_the_stage_and_its_dependents(micro_run):
    done, root, _, _ = micro_run
    corpus = done.data.corpus
    cfg = load_pipeline_config("micro", overrides=[f"data.corpus={corpus}", "sft.train.max_steps=7"])
    steps = {s.stage: s for s in plan(cfg, root)}
    assert [s for s, st in steps.items() if st.action == "skip"] == ["tokenizer", "data", "pretrain"]
    assert steps["sft"].reason == "config changed (sft.train.max_steps: 6 -> 7)"
    assert steps["dpo"].reason == "after stage 'sft', which is redone"
    cfg = load_pipeline_config("micro", overrides=[f"data.corpus={corpus}", "rm.train.lr=5e-4"])
    redo = [s.stage for s in plan(cfg, root) if s.action == "run"]
    assert redo == ["rm", "ppo", "quantize", "eval", "report"]  # dpo and grpo do not read the reward model


def test_corrupt_output_is_redone(micro_run):
    cfg, root, _, _ = micro_run
    weights = root / "dpo" / "final" / "model.safetensors"
    saved = weights.read_bytes()
    try:
        weights.write_bytes(saved[:100])
        steps = {s.stage: s for s in plan(cfg, root)}
        assert steps["dpo"].reason == "its output is missing or corrupt"
        assert steps["sft"].action == "skip" and steps["rm"].action == "skip"
        assert steps["grpo"].reason == "after stage 'dpo', which is redone"
    finally:
        weights.write_bytes(saved)
    assert all(s.action == "skip" for s in plan(cfg, root))


def test_killed_stage_resumes_from_its_checkpoint(micro_run, tmp_path):
    cfg, root, _, _ = micro_run
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    # A run killed after pretrain's step-5 checkpoint: no final, no done-marker, the started-marker kept.
    done = json.loads(marker_path(copy, "pretrain").read_text())
    marker_path(copy, "pretrain").unlink()
    marker_path(copy, "pretrain", started=True).write_text(
        json.dumps({"fingerprint": {"config_hash": done["config_hash"], "inputs": done["inputs"]}})
    )
    shutil.rmtree(copy / "pretrain" / "final")
    shutil.rmtree(copy / "pretrain" / ckpt_name(10))
    write_latest(copy / "pretrain", ckpt_name(5))
    lines: list[str] = []
    results = run_pipeline(cfg, copy, only="pretrain", echo=lines.append)
    assert any("resuming the interrupted run" in line for line in lines)
    assert results["pretrain"]["summary"]["steps"] == 10
    rows = [json.loads(x) for x in (copy / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if r.get("split") == "train"]
    assert logged.count(2) == 1 and logged.count(6) == 2  # steps 1-5 were not redone, 6-10 were
    assert json.loads(marker_path(copy, "pretrain").read_text())["resumed"] is True


def test_only_without_inputs_names_the_producing_stage(tmp_path):
    cfg = load_pipeline_config("micro")
    with pytest.raises(ConfigError, match="input from stage 'sft'.*--only sft"):
        plan(cfg, tmp_path / "fresh", only="dpo")


def test_bad_preset_and_stage_list_the_known_ones(tmp_path, capsys):
    assert main(["pipeline", "--preset", "huge", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'huge' (presets: tiny, micro, smollm2, gpu)" in capsys.readouterr().err
    assert main(["pipeline", "--preset", "micro", "--only", "distill", "--out", str(tmp_path)]) == 2
    assert "unknown stage 'distill' (stages: tokenizer, data, pretrain, sft" in capsys.readouterr().err
    assert main(["pipeline", "--preset", "micro", "--out", str(tmp_path), "stages=[data,sftt]"]) == 2
    assert "unknown stage 'sftt'" in capsys.readouterr().err
    assert main(["pipeline", "--preset", "micro", "--out", str(tmp_path), "sft.train.max_stepz=3"]) == 2
    assert "max_stepz" in capsys.readouterr().err


def test_report_renders_in_chromium_without_broken_images(micro_run, tmp_path):
    from pathlib import Path

    if not Path("/usr/bin/chromium").exists():
        pytest.skip(
            "Debian chromium is not installed at /usr/bin/chromium (make test installs it best-effort)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    _, root, _, _ = micro_run
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((root / "report" / "index.html").resolve().as_uri())
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth])")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert len(images) >= 6  # eval bars, losses, DPO/GRPO/PPO curves, analysis figures
    broken = [alt for alt, complete, width in images if not complete or width == 0]
    assert not broken, f"broken images: {broken}"
    assert (tmp_path / "report.png").stat().st_size > 20_000


def test_killed_rl_stage_resumes_from_its_rollout_checkpoint(micro_run, tmp_path):
    """GRPO killed after its first rollout step's checkpoint: the rerun continues at step 2 (not 1) and keeps
    the starting policy's held-out metrics."""
    from safetensors.torch import load_file

    cfg, root, _, _ = micro_run
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    done = json.loads(marker_path(copy, "grpo").read_text())
    marker_path(copy, "grpo").unlink()
    marker_path(copy, "grpo", started=True).write_text(
        json.dumps({"fingerprint": {"config_hash": done["config_hash"], "inputs": done["inputs"]}})
    )
    shutil.rmtree(copy / "grpo" / "final")
    ckpts = sorted(p.name for p in (copy / "grpo").glob("ckpt-*"))
    assert len(ckpts) == 2  # one per rollout step (save_every=1)
    shutil.rmtree(copy / "grpo" / ckpts[-1])
    write_latest(copy / "grpo", ckpts[0])
    lines: list[str] = []
    results = run_pipeline(cfg, copy, only="grpo", echo=lines.append)
    assert any("grpo: resuming the interrupted run" in line for line in lines)
    rows = [json.loads(x) for x in (copy / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split") == "train"] == [1, 2, 2]  # step 1 was not redone
    summary = results["grpo"]["summary"]
    assert summary["before_exact_match"] == done["summary"]["before_exact_match"]
    # (The micro model's rewards are all 0, so its policy never moves; that a resumed run ends with the same
    # trained policy is tests/test_align_rl.py::test_ppo_resumed_after_a_kill_ends_with_the_same_policy.)
    resumed = load_file(copy / "grpo" / "final" / "model.safetensors")
    original = load_file(root / "grpo" / "final" / "model.safetensors")
    assert all(torch.equal(resumed[k], original[k]) for k in original)
