"""The SFT summary: forgetting flagged above a threshold, and the skipped and duplicate record counts."""

from __future__ import annotations

import pytest

from llmlab.errors import ConfigError
from llmlab.recipes.sft import SFTConfig, format_sft_report


def _report(rise_pct: float, flagged: bool) -> dict:
    return {
        "base": "b",
        "data": "d.jsonl",
        "peft": "none",
        "examples": {
            "train": 90,
            "val": 5,
            "records": 120,
            "skipped_invalid": 7,
            "duplicates": 18,
            "truncated": 2,
        },
        "params": {"trainable": 10, "params": 10},
        "train": {"steps": 4, "early_stopped_at": None, "tokens_per_s": 100.0},
        "peak_rss_mb": 10.0,
        "before": {"sft_val_loss": 2.0, "general_loss": 3.0},
        "after": {"sft_val_loss": 1.0, "general_loss": 3.0 * (1 + rise_pct / 100)},
        "general_loss_rise_pct": rise_pct,
        "forgetting_flagged": flagged,
        "forget_warn_pct": 10.0,
    }


def test_forgetting_is_flagged_above_the_threshold():
    text = format_sft_report(_report(416.0, True))
    assert "WARNING: forgetting: the general-text loss rose 416.0% (more than 10%)" in text
    assert "replay_fraction" in text  # and what to try
    assert "WARNING" not in format_sft_report(_report(3.4, False))


def test_the_summary_counts_skipped_and_duplicate_records():
    text = format_sft_report(_report(1.0, False))
    assert "120 records, 7 skipped as invalid, 18 duplicate prompts removed, 2 truncated" in text


def test_the_threshold_is_a_config_key():
    assert SFTConfig().forget_warn_pct == 10.0
    with pytest.raises(ConfigError, match="forget_warn_pct"):
        SFTConfig(forget_warn_pct=-1).validate()
