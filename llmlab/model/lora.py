"""LoRA: low-rank adapters on the Transformer's linear layers, saved in PEFT's format.

``h = W x + (alpha / r) * B A x`` with ``A`` (r x d_in) Kaiming-uniform and ``B`` (d_out x r) zero, so a
freshly wrapped model computes exactly what the base computes. Only ``A`` and ``B`` require grad.

A wrapped layer is a :class:`LoRALinear` holding the original layer as ``base_layer`` (an ``nn.Linear`` or,
for QLoRA, a frozen ``NF4Linear``) plus ``lora_A``/``lora_B``, the same module layout as PEFT. Adapter files
follow PEFT exactly (``adapter_config.json`` + ``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), so ``peft`` can load an llmlab adapter
onto the transformers export of the same base and vice versa.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from llmlab.errors import CheckpointError, ConfigError
from llmlab.model.checkpoint import atomic_write_file, load_state_dict

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Short target names accepted in configs ("q,v" or "q_proj,v_proj" or "all").
SHORT_TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
ALL_TARGETS = list(SHORT_TARGETS.values())


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r (rsLoRA)
    use_dora: bool = False  # DoRA (llmlab.model.peft.dora): wrap with DoRALinear via llmlab.model.peft

    def validate(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"config key 'lora.r' must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {self.dropout}")
        target_names(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def target_names(targets: Sequence[str]) -> list[str]:
    """Expand short names (``q`` -> ``q_proj``, ``all``) and reject unknown ones."""
    out: list[str] = []
    for t in targets:
        t = t.strip()
        if t == "all":
            names = ALL_TARGETS
        elif t in SHORT_TARGETS:
            names = [SHORT_TARGETS[t]]
        elif t in ALL_TARGETS or t == "lm_head":
            names = [t]
        else:
            known = ", ".join([*SHORT_TARGETS, *ALL_TARGETS, "lm_head", "all"])
            raise ConfigError(f"unknown LoRA target {t!r} (known: {known})")
        out += [n for n in names if n not in out]
    return out


class LoRALinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``; merge/unmerge fold the update into W."""

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        weight = _base_weight_ref(base_layer)
        # Adapters stay in floating point even when the base weight is packed NF4 (QLoRA).
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.reset_lora()

    def reset_lora(self) -> None:
        # PEFT's default init: A like nn.Linear (Kaiming uniform, a=sqrt(5)), B zero -> no change at start.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def adapter_tensors(self) -> dict[str, Tensor]:
        """The saved tensors by their key suffix (PEFT's names); subclasses (DoRA) add theirs."""
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.disabled or self.merged:
            return out
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return out + nn.functional.linear(nn.functional.linear(self.lora_dropout(x), a), b) * self.scaling

    def merge(self) -> None:
        if self.merged:
            return
        if not isinstance(self.base_layer, nn.Linear):
            raise ConfigError("cannot merge LoRA into a quantized base layer; dequantize the base first")
        with torch.no_grad():
            w = self.base_layer.weight
            w += self.delta_weight().to(w.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            w = self.base_layer.weight
            w -= self.delta_weight().to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _base_weight_ref(layer: nn.Module) -> Tensor:
    for p in layer.parameters():
        return p
    for b in layer.buffers():
        return b
    return torch.empty(0)


# ------------------------------------------------------------------------------------- wrap / unwrap
def matches_targets(name: str, targets: Sequence[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in targets


def apply_lora(model: nn.Module, cfg: LoRAConfig, layer_cls: type[LoRALinear] | None = None) -> list[str]:
    """Wrap the target linear layers with LoRA and freeze everything else. Returns the wrapped names.

    ``layer_cls``: the wrapper class (DoRA passes ``DoRALinear``; it lives in llmlab.model.peft, above this
    module, so a DoRA config without it is refused here rather than silently trained as plain LoRA).
    """
    cfg.validate()
    if cfg.use_dora and layer_cls is None:
        raise ConfigError(
            "DoRA (use_dora) adapters are applied by llmlab.model.peft.apply_peft(model, 'dora')"
        )
    layer_cls = layer_cls or LoRALinear
    targets = target_names(cfg.targets)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear) or ".base_layer" in name or not matches_targets(name, targets):
            continue
        if not hasattr(module, "in_features"):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, layer_cls(module, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora))
        wrapped.append(name)
    if not wrapped:
        raise ConfigError(f"no layer matches the LoRA targets {targets}")
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_A." in pname or ".lora_B." in pname or ".lora_magnitude_vector" in pname)
    model.lora_config = cfg  # remembered for save_adapter
    return wrapped


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def merge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layers back (for a full checkpoint)."""
    for name, m in list(lora_layers(model)):
        m.merge()
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, m.base_layer)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model without adapters (e.g. the DPO reference policy)."""
    layers = [m for _, m in lora_layers(model)]
    if any(m.merged for m in layers):
        raise ConfigError("cannot disable merged adapters; unmerge first")
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, prev in zip(layers, previous):
            m.disabled = prev


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------- PEFT format
def peft_key(name: str) -> str:
    """llmlab module name -> PEFT adapter key prefix (the HF Llama layout puts the body under ``model.``)."""
    if name.startswith("lm_head"):
        return PEFT_PREFIX + name
    return PEFT_PREFIX + "model." + name


def llmlab_name(key: str) -> str:
    """PEFT adapter key -> llmlab parameter name (inverse of :func:`peft_key`, adapter name dropped)."""
    if not key.startswith(PEFT_PREFIX):
        raise CheckpointError(f"adapter tensor '{key}' does not start with '{PEFT_PREFIX}'")
    name = key[len(PEFT_PREFIX) :]
    if name.startswith("model."):
        name = name[len("model.") :]
    # PEFT may keep the adapter name in keys ("lora_A.default.weight"); files written by save_pretrained don't.
    name = re.sub(r"\.lora_magnitude_vector\.[^.]+\.weight$", ".lora_magnitude_vector", name)
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for name, m in lora_layers(model):
        for suffix, tensor in m.adapter_tensors().items():
            out[f"{peft_key(name)}.{suffix}"] = tensor.detach().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format), each atomically."""

    layers = list(lora_layers(model))
    if not layers:
        raise ConfigError("model has no LoRA adapters to save")
    if getattr(getattr(model, "cfg", None), "arch", "llama") == "gpt2":
        raise ConfigError("PEFT adapter export needs the Llama module layout; GPT-2 fuses c_attn")
    first = layers[0][1]
    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    targets = sorted({name.rsplit(".", 1)[-1] for name, _ in layers})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": cfg.dropout if cfg else 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": bool(cfg.use_rslora) if cfg else False,
        "use_dora": bool(getattr(first, "use_dora", False)),
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    state = adapter_state_dict(model)
    directory = Path(directory)
    # File by file (weights first, config last), never replacing the directory: an SFT run keeps its logs
    # and resumable checkpoints beside the adapter.
    atomic_write_file(
        directory / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"})
    )
    atomic_write_file(
        directory / ADAPTER_CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2), encoding="utf-8")
    )
    return directory


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a LoRA adapter directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if data.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {data.get('peft_type')!r} is not supported (only LORA)")
    for key in ("rank_pattern", "alpha_pattern"):
        if data.get(key):
            raise CheckpointError(f"{path}: per-module '{key}' is not supported")
    if data.get("bias", "none") != "none" or data.get("modules_to_save"):
        raise CheckpointError(f"{path}: adapters with trained biases or modules_to_save are not supported")
    targets = data.get("target_modules") or []
    if isinstance(targets, str):
        raise CheckpointError(f"{path}: regex target_modules are not supported; list the module names")
    try:
        return LoRAConfig(
            r=int(data["r"]),
            alpha=float(data.get("lora_alpha", data["r"])),
            dropout=float(data.get("lora_dropout", 0.0)),
            targets=[t for t in targets],
            use_rslora=bool(data.get("use_rslora", False)),
            use_dora=bool(data.get("use_dora", False)),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad adapter config ({exc})") from exc


def apply_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    trainable: bool = False,
    layer_cls: type[LoRALinear] | None = None,
) -> nn.Module:
    """Wrap ``model`` with the LoRA adapter saved in ``adapter_dir`` (llmlab- or PEFT-written); DoRA adapters
    come through :func:`llmlab.model.peft.load_adapter`, which passes ``DoRALinear`` as ``layer_cls``."""

    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    if cfg.use_dora and layer_cls is None:
        raise CheckpointError(f"{adapter_dir}: a DoRA adapter; load it with llmlab.load(base, adapter=...)")
    weights = adapter_dir / ADAPTER_WEIGHTS
    state = load_state_dict(weights)
    cfg.dropout = cfg.dropout if trainable else 0.0
    try:
        apply_lora(model, cfg, layer_cls)
    except ConfigError as exc:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: {exc}") from exc
    own = {
        f"{name}.{suffix}": t for name, m in lora_layers(model) for suffix, t in m.adapter_tensors().items()
    }
    seen = set()
    for key, tensor in state.items():
        name = llmlab_name(key)
        if name not in own:
            raise CheckpointError(f"{weights}: tensor '{key}' has no matching LoRA layer in the base model")
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{weights}: tensor '{key}' has shape {tuple(tensor.shape)}, the base model needs "
                f"{tuple(own[name].shape)} (adapter made for a different base?)"
            )
        with torch.no_grad():
            own[name].copy_(tensor.to(own[name].dtype))
        seen.add(name)
    missing = [n for n in own if n not in seen]
    if missing:
        raise CheckpointError(
            f"{weights}: missing tensor for '{peft_key(missing[0])}' ({len(missing)} missing)"
        )
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def describe(model: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = trainable_parameters(model)
    return {"params": total, "trainable": trainable, "trainable_pct": 100.0 * trainable / max(total, 1)}
