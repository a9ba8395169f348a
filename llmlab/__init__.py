"""llmlab: the whole modern LLM pipeline in one readable, tested PyTorch codebase.

Public entry points (imported lazily so ``import llmlab`` stays fast):

- ``model, tokenizer = llmlab.load(path, adapter=None)``: llmlab checkpoint dir, run dir, HF dir, ``.gguf`` file
  or ``"smollm2"``.
- ``llm = llmlab.LLM(path)``; ``llm.generate(prompts, llmlab.SamplingParams(...))``: the generation engine.
- ``llmlab.evaluate(...)``: the evaluation harness (:mod:`llmlab.eval`).
- ``llmlab.Trainer``, ``llmlab.TrainConfig``: the one training loop; ``llmlab.resolve_model_path(name)``.

``dir(llmlab)`` lists exactly this public API (``__all__``).
"""

from __future__ import annotations

import logging
import os

from llmlab.lazy import lazy_exports

# Nothing in llmlab may reach a model hub at run time.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

# bitsandbytes (pulled in by transformers/peft, a dev/interop dependency) warns on every import on AVX512-BF16
# CPUs that an optional hub kernel is missing; llmlab never uses bitsandbytes' kernels (quant/ has its own).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

_LAZY = {
    "load": "llmlab.loading",
    "resolve_model_path": "llmlab.loading",
    "evaluate": "llmlab.eval",
    "Trainer": "llmlab.train",
    "TrainConfig": "llmlab.train",
    "LLM": "llmlab.infer",
    "SamplingParams": "llmlab.infer",
    "Transformer": "llmlab.model",
    "ModelConfig": "llmlab.model",
    "Tokenizer": "llmlab.tokenizer",
}

__getattr__ = lazy_exports("llmlab", _LAZY)

__all__ = sorted(["__version__", *_LAZY])


def __dir__() -> list[str]:
    return list(__all__)
