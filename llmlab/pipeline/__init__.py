"""``llmlab pipeline``: every stage from raw text to an aligned, evaluated, quantized model, resumably.

:mod:`.config` (the one typed config and its presets), :mod:`.stages` (each stage as a call into its recipe;
the only module that imports recipes), :mod:`.runner` (done-markers, invalidation, resume, progress),
:mod:`.evaluation` (every model on the same tasks), :mod:`.report` (the report card), :mod:`.cli`.
"""

from __future__ import annotations

from llmlab.lazy import lazy_exports

_LAZY = {
    "PipelineConfig": "llmlab.pipeline.config",
    "PIPELINE_PRESETS": "llmlab.pipeline.config",
    "STAGES": "llmlab.pipeline.config",
    "load_pipeline_config": "llmlab.pipeline.config",
    "run_pipeline": "llmlab.pipeline.runner",
}

__getattr__ = lazy_exports("llmlab.pipeline", _LAZY)

__all__ = sorted(_LAZY)
