"""The model layer: config, the Transformer, its KV cache, and FLOP/parameter accounting."""

from llmlab.model.config import MODEL_PRESETS, ModelConfig, RopeScaling
from llmlab.model.kv_cache import KVCache
from llmlab.model.transformer import AttnMeta, Transformer, flops_per_token, num_params

__all__ = [
    "MODEL_PRESETS",
    "AttnMeta",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "flops_per_token",
    "num_params",
]
