"""Trainer.fit's hooks (on_eval, should_stop, save_final), the one evaluation loop, MFU against both peaks and
FLOPs per token under a sliding window."""

from __future__ import annotations

import math

import torch
from _train_helpers import byte_shards, tiny_model_config

from llmlab.data.loader import PackedLoader, iterate_split
from llmlab.losses import LossOutput
from llmlab.model.transformer import Transformer, flops_per_token
from llmlab.train import TrainConfig, Trainer, evaluate_loss, make_eval_fn
from llmlab.train.logging import read_metrics


def _trainer(tmp_path, **cfg) -> Trainer:
    data = byte_shards(tmp_path / "data", 20_000)
    base = dict(
        max_steps=6, batch_size=2, seq_len=32, eval_every=2, eval_batches=1, log_every=1, warmup_steps=1,
        progress=False, tensorboard=False, plot=False, lr=1e-3, min_lr=1e-4,
    )  # fmt: skip
    t = TrainConfig(**{**base, **cfg})
    torch.manual_seed(0)
    source = PackedLoader(data, "train", t.batch_size, t.seq_len, t.seed)
    eval_fn = make_eval_fn(lambda: iterate_split(data, "val", t.seq_len, t.batch_size, 1))
    return Trainer(Transformer(tiny_model_config()), t, source, eval_fn=eval_fn, out_dir=tmp_path / "run")


def test_fit_hooks_see_evals_stop_early_and_replace_the_final_save(tmp_path):
    trainer = _trainer(tmp_path)
    seen, saved = [], []
    trainer.fit(
        on_eval=lambda m: seen.append((trainer.step, m["loss"])),
        should_stop=lambda step: step >= 4,
        save_final=lambda: saved.append(trainer.step),
    )
    # Evaluations at steps 2 and 4, then the stop at 4 (before step 6) and the final evaluation.
    assert [s for s, _ in seen] == [2, 4, 4] and all(math.isfinite(loss) for _, loss in seen)
    assert trainer.step == 4 and saved == [4]
    assert not (tmp_path / "run" / "final").exists()  # save_final replaced the default artefact
    events = [r["event"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "event" in r]
    assert "early_stop" in events


def test_fit_without_hooks_trains_to_max_steps(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3, eval_every=0)
    trainer.fit()
    assert trainer.step == 3 and (tmp_path / "run" / "final" / "config.json").is_file()


def test_evaluate_is_the_weighted_mean_of_sums_and_metrics():
    model = torch.nn.Linear(1, 1)

    def loss_fn(m, batch):
        x = batch["x"]
        return LossOutput(x.sum(), float(x.numel()), {"first": float(x[0])})

    batches = [{"x": torch.tensor([1.0, 1.0, 1.0])}, {"x": torch.tensor([5.0])}]
    out = evaluate_loss(model, batches, loss_fn)
    assert out["loss"] == (3.0 + 5.0) / 4  # per element, not the mean of the two batch means (3.0)
    assert out["first"] == (1.0 * 3 + 5.0 * 1) / 4
    assert model.training  # the mode is restored
    assert math.isnan(evaluate_loss(model, [], loss_fn)["loss"])


def test_mfu_is_logged_against_the_measured_and_the_datasheet_peak(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, eval_every=0, peak_tflops=1.0, datasheet_tflops=2.0)
    trainer.fit()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "mfu" in r]
    assert rows and all(r["mfu_datasheet"] == r["mfu"] / 2 for r in rows)
    fields = Trainer._progress_fields({"loss": 1.0, "tokens_per_s": 10.0, "mfu": 0.5, "mfu_datasheet": 0.25})
    assert fields["mfu_measured_peak"] == "50.0%" and fields["mfu_datasheet_peak"] == "25.0%"


def test_flops_per_token_counts_only_the_window_a_query_sees():
    full = tiny_model_config(max_seq_len=256)
    windowed = tiny_model_config(max_seq_len=256, sliding_window=64)
    assert flops_per_token(windowed, 256) < flops_per_token(full, 256)
    assert flops_per_token(windowed, 256) == flops_per_token(full, 64)  # attention spans 64 keys either way
    assert flops_per_token(windowed, 32) == flops_per_token(full, 32)  # shorter than the window: unchanged


def test_pretrain_ends_with_its_report_and_never_replaces_a_run_silently(tmp_path, capsys):
    from llmlab.cli import main

    data = byte_shards(tmp_path / "data", 20_000)
    out = tmp_path / "run"
    common = [
        f"data.dir={data}", "model.vocab_size=257", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
        "model.n_kv_heads=1", "model.max_seq_len=32", "seq_len=32", "batch_size=2", "precision=fp32",
        "progress=false", "tensorboard=false", "plot=false", "eval_batches=1", "eval_every=0", "log_every=1",
        "peak_tflops=1",
    ]  # fmt: skip
    assert main(["pretrain", "--out", str(out), "max_steps=4", "save_every=2", "keep_last=5", *common]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'pretrain_report.json'}" in printed and "next:   llmlab generate" in printed
    assert (out / "pretrain_report.json").is_file() and (out / "ckpt-0000002").is_dir()
    # The bug of issue 17: a second run into the same --out rewrote final/, cut metrics.jsonl, left ckpt-2.
    assert main(["pretrain", "--out", str(out), "max_steps=1", *common]) == 2
    assert "holds a previous run; pass --resume" in capsys.readouterr().err
    assert (out / "ckpt-0000002").is_dir()
    assert main(["pretrain", "--out", str(out), "--overwrite", "max_steps=1", *common]) == 0
    assert not (out / "ckpt-0000002").exists() and (out / "final").is_dir()
    assert len(read_metrics(out / "metrics.jsonl")) >= 1
