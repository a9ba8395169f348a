"""``llmlab analyze BEFORE AFTER [--adapter DIR] --out DIR``: what one training stage changed.

Writes ``analysis.json`` (``param_delta[group][layer]``, ``attention[...]``, ``outputs``, spectra, summaries)
and the figures ``param_delta.png`` (layers x groups heatmap), ``attention.png`` (per-head entropy and keyword
mass before/after, per-head JS divergence) and, with an adapter, ``lora_spectrum.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmlab.analysis import attention as A
from llmlab.analysis import params as P
from llmlab.errors import ConfigError

ANALYSIS_FILE = "analysis.json"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def analyze(before: str | Path, after: str | Path, out: str | Path, adapter: str | Path | None = None,
            n_prompts: int = 8) -> dict[str, Any]:  # fmt: skip
    """Compare two checkpoints of one architecture (``after`` may be ``before`` + ``adapter``)."""
    from llmlab.loading import load
    from llmlab.train.logging import jsonable

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_b, tok = load(before)
    if tok is None:
        raise ConfigError(f"{before}: has no tokenizer; the attention probes need one")
    lora = None
    if adapter is not None:  # AFTER + adapter, merged; the adapter's own update is measured against AFTER
        from llmlab.model.lora import merge_and_unload

        base_after, _ = load(after)
        lora = _adapter_update(adapter, _state(base_after))
        del base_after
        model_a, tok_a = load(after, adapter=adapter)
        model_a = merge_and_unload(model_a).eval()
    else:
        model_a, tok_a = load(after)
    if tok_a is not None and tok_a.vocab_size != tok.vocab_size:
        raise ConfigError(
            f"{before} and {after} have different tokenizers: nothing to compare position by position"
        )
    sb, sa = _state(model_b), _state(model_a)
    delta = P.param_delta(sb, sa)
    result: dict[str, Any] = {
        "before": str(before),
        "after": str(after),
        "adapter": str(adapter) if adapter else None,
    }
    result.update(delta)
    if lora is not None:
        result["param_delta"]["lora"] = lora["per_layer"]
        result["lora_spectra"] = lora["spectra"]
    result["update_spectra"] = P.update_spectra(sb, sa)
    ranks = [v["effective_rank"] for v in result["update_spectra"].values()]
    result["mean_effective_rank"] = sum(ranks) / len(ranks) if ranks else 0.0
    result["summary"] = P.summary_line(delta)
    att = A.compare_attention(model_b, model_a, tok, A.PROBES[:n_prompts])
    result["attention"] = {k: v for k, v in att.items() if k != "outputs"}
    result["outputs"] = att.get("outputs", {})
    result["attention_summary"] = A.attention_sentence(att)
    result["figures"] = plot_all(result, out)
    (out / ANALYSIS_FILE).write_text(json.dumps(jsonable(result), indent=2), encoding="utf-8")
    return result


def _adapter_update(adapter: str | Path, base_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    from safetensors.torch import load_file

    from llmlab.model.lora import llmlab_name, read_adapter_config

    adapter = Path(adapter)
    cfg = read_adapter_config(adapter)
    raw = load_file(str(adapter / "adapter_model.safetensors"))
    state = {llmlab_name(k): v for k, v in raw.items()}
    scale = cfg.alpha / (cfg.r**0.5 if cfg.use_rslora else cfg.r)
    return P.lora_delta(state, base_state, scale)


# ------------------------------------------------------------------------------------------ figures
def plot_all(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    files = [_plot_delta(result, out / "param_delta.png")]
    if result.get("attention"):
        files.append(_plot_attention(result["attention"], out / "attention.png"))
    spectra = result.get("lora_spectra") or result.get("update_spectra")
    if spectra:
        files.append(_plot_spectrum(spectra, out / "update_spectrum.png", bool(result.get("lora_spectra"))))
    return [Path(f).name for f in files]


def _plot_delta(result: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    delta = result["param_delta"]
    groups = list(delta)
    layers = sorted(
        {layer for g in groups for layer in delta[g]}, key=lambda x: (x == "-", int(x) if x != "-" else 0)
    )
    grid = np.full((len(layers), len(groups)), np.nan)
    for j, g in enumerate(groups):
        for i, layer in enumerate(layers):
            if layer in delta[g]:
                grid[i, j] = delta[g][layer]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(groups), 1.2 + 0.35 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yticks(range(len(layers)), [f"layer {x}" if x != "-" else "outside blocks" for x in layers])
    fig.colorbar(im, ax=ax, label="||dW|| / ||W||")
    ax.set_title("relative update per group and layer")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_attention(att: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, label in ((axes[0], "entropy", "entropy (nats)"), (axes[1], "keyword_mass", "keyword mass")):
        b, a = np.array(att[key]["before"]).ravel(), np.array(att[key]["after"]).ravel()
        x = np.arange(len(b))
        ax.bar(x - 0.2, b, 0.4, label="before")
        ax.bar(x + 0.2, a, 0.4, label="after")
        ax.set_xlabel("head (layer-major)")
        ax.set_title(f"answer tokens: {label}")
        ax.legend(fontsize=8)
    js = np.array(att["js_divergence"])
    im = axes[2].imshow(js, aspect="auto", cmap="magma")
    axes[2].set_xlabel("head")
    axes[2].set_ylabel("layer")
    axes[2].set_title("JS divergence before/after")
    fig.colorbar(im, ax=axes[2])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_spectrum(spectra: dict[str, Any], path: Path, lora: bool) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for s in list(spectra.values())[:24]:
        sv = s["singular_values"]
        if sv and sv[0] > 0:
            ax.semilogy(range(1, len(sv) + 1), [x / sv[0] for x in sv], alpha=0.5, lw=1)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("s_i / s_1")
    ax.set_title(("LoRA update" if lora else "weight update") + " singular value spectra")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
