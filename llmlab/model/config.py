"""The one model config. Llama, Qwen2, Mistral and GPT-2 are points in this space:

| family  | norm      | ffn    | positions | qkv_bias | sliding_window | tied |
|---------|-----------|--------|-----------|----------|----------------|------|
| llama   | rmsnorm   | swiglu | rope      | no       | no             | opt. |
| qwen2   | rmsnorm   | swiglu | rope      | yes      | opt.           | opt. |
| qwen3   | rmsnorm   | swiglu | rope      | opt.     | opt.           | opt. |  (+ qk_norm)
| mistral | rmsnorm   | swiglu | rope      | no       | opt.           | no   |
| gpt2    | layernorm | gelu   | learned   | yes      | no             | yes  |

The MoE families are their dense siblings with ``ffn="moe"`` (:mod:`llmlab.model.moe`): mixtral (mistral's
layout), qwen2_moe (qwen2's, plus a gated shared expert), qwen3_moe (qwen3's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmlab.errors import ConfigError

NORMS = ("rmsnorm", "layernorm")
FFNS = ("swiglu", "gelu", "moe")
MOE_ROUTERS = ("softmax_topk", "topk_softmax")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
POSITIONS = ("rope", "learned", "alibi", "none")
ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")


@dataclass
class RopeScaling:
    """RoPE frequency scaling for running past the trained context.

    - ``linear``: positions divided by ``factor`` (position interpolation).
    - ``ntk``: NTK-aware, static: ``theta' = theta * factor ** (d / (d - 2))``.
    - ``dynamic``: NTK with ``factor`` grown from the current length (as transformers' "dynamic").
    - ``yarn``: per-frequency interpolation/extrapolation ramp plus attention temperature.
    - ``llama3``: Llama-3.1's low/high frequency smoothing.
    """

    type: str = "none"
    factor: float = 1.0
    original_max_seq_len: int | None = None
    # YaRN
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def validate(self) -> None:
        if self.type not in ROPE_SCALINGS:
            raise ConfigError(
                f"config key 'rope_scaling.type' must be one of {list(ROPE_SCALINGS)}, got {self.type!r}"
            )
        if self.type != "none" and self.factor <= 0:
            raise ConfigError("config key 'rope_scaling.factor' must be > 0")


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); 1: MQA; else GQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: 4*d (gelu) or 8/3*d rounded up to 64 (swiglu)
    max_seq_len: int = 256
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = False  # LayerNorm bias (GPT-2)
    ffn: str = "swiglu"
    activation: str = "silu"
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qkv_bias: bool = False
    # RMSNorm over head_dim on each query and key head before RoPE (Qwen3's q_norm/k_norm; stabilises training)
    qk_norm: bool = False
    out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False
    tie_embeddings: bool = True
    sliding_window: int | None = None
    # False: bidirectional attention (an encoder, trained with objective=mlm); it cannot decode left to right
    causal: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # ffn="moe" (llmlab.model.moe): a top-k router over n_experts SwiGLU experts of moe_d_ff each
    # (None: d_ff), optional gated shared expert(s) of shared_expert_d_ff (0: none), capacity-factor dropping
    n_experts: int = 8
    experts_top_k: int = 2
    moe_d_ff: int | None = None
    shared_expert_d_ff: int = 0
    moe_router: str = "softmax_topk"  # or "topk_softmax" (softmax over the k chosen logits)
    norm_topk_prob: bool = True  # softmax_topk: renormalize the k chosen probabilities to sum to 1
    capacity_factor: float | None = None  # None: no dropping; else capacity = ceil(cf * tokens * k / E)
    aux_loss_weight: float = 0.01  # Switch/Mixtral load-balancing loss (llmlab.losses.moe)
    router_z_loss_weight: float = 0.001  # ST-MoE router z-loss
    arch: str = "llama"  # the HF family this config came from / exports to

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.ffn == "gelu":
            return 4 * self.d_model
        hidden = int(8 * self.d_model / 3)
        return 64 * ((hidden + 63) // 64)

    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"model config: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise bad(f"'{name}' must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise bad(f"'n_heads' ({self.n_heads}) must divide 'd_model' ({self.d_model})")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise bad(f"'n_kv_heads' ({self.kv_heads}) must divide 'n_heads' ({self.n_heads})")
        if self.position == "rope" and self.dim_head % 2:
            raise bad(f"RoPE needs an even head dim, got {self.dim_head}")
        if self.norm not in NORMS:
            raise bad(f"'norm' must be one of {list(NORMS)}, got {self.norm!r}")
        if self.ffn not in FFNS:
            raise bad(f"'ffn' must be one of {list(FFNS)}, got {self.ffn!r}")
        if self.activation not in ACTIVATIONS:
            raise bad(f"'activation' must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        if self.position not in POSITIONS:
            raise bad(f"'position' must be one of {list(POSITIONS)}, got {self.position!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise bad("'sliding_window' must be positive or null")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("'dropout' must be in [0, 1)")
        if self.ffn == "moe":
            self._validate_moe(bad)
        self.rope_scaling.validate()

    def _validate_moe(self, bad: Callable[[str], ConfigError]) -> None:
        if self.n_experts <= 0 or self.experts_top_k <= 0:
            raise bad(
                f"'n_experts' ({self.n_experts}) and 'experts_top_k' ({self.experts_top_k}) must be positive"
            )
        if self.experts_top_k > self.n_experts:
            raise bad(
                f"'experts_top_k' ({self.experts_top_k}) must be <= 'n_experts' ({self.n_experts}): "
                "a token cannot be routed to more experts than exist"
            )
        if self.moe_router not in MOE_ROUTERS:
            raise bad(f"'moe_router' must be one of {list(MOE_ROUTERS)}, got {self.moe_router!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise bad(f"'capacity_factor' must be positive or null, got {self.capacity_factor}")
        if (self.moe_d_ff is not None and self.moe_d_ff <= 0) or self.shared_expert_d_ff < 0:
            raise bad("'moe_d_ff' must be positive (or null) and 'shared_expert_d_ff' >= 0")
        if self.aux_loss_weight < 0 or self.router_z_loss_weight < 0:
            raise bad("'aux_loss_weight' and 'router_z_loss_weight' must be >= 0")
        if self.mlp_bias:
            raise bad("'mlp_bias' is not supported with ffn='moe' (experts have no biases)")

    @property
    def expert_dim(self) -> int:
        """Hidden size of one routed expert (``moe_d_ff``, else the dense ``ffn_dim``)."""
        return self.moe_d_ff if self.moe_d_ff is not None else self.ffn_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        from llmlab.config import from_dict

        try:
            return from_dict(cls, dict(data))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc


# Named model shapes. "tiny" trains on a 2-core CPU in minutes; "gpt2-124m" is the GPU reference size.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "small-14m": ModelConfig(
        vocab_size=8192, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, max_seq_len=256
    ),
    "gpt2-124m": ModelConfig(
        vocab_size=50304,
        d_model=768,
        n_layers=12,
        n_heads=12,
        max_seq_len=1024,
        norm="layernorm",
        norm_bias=True,
        ffn="gelu",
        activation="gelu_tanh",
        position="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        arch="gpt2",
    ),
}
