"""The report card: ``DIR/report/index.html`` (one self-contained page, images embedded) and ``report.md``.

Plots (matplotlib, from the stages' own ``metrics.jsonl``): loss curves per stage; GRPO/PPO reward, KL and
verifier accuracy; DPO's implicit-reward margin and chosen/rejected implicit rewards; the eval metrics per
stage as a grouped bar chart. Then samples side by side, a table of wall time, tokens, tokens/s and MFU per
stage, each stage's config, and ``llmlab analyze`` for each pair of consecutive model stages.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmlab.pipeline.config import MODEL_STAGES, STAGES

if TYPE_CHECKING:
    from llmlab.pipeline.config import PipelineConfig

CURVES = {  # stage -> [(metric, label)] plotted from its train rows
    "dpo": [("reward_margin", "implicit-reward margin"), ("rewards_chosen", "chosen: beta*log(pi/ref)"),
            ("rewards_rejected", "rejected: beta*log(pi/ref)")],
    "grpo": [("reward_mean", "reward"), ("kl", "KL to reference"), ("accuracy", "verifier accuracy")],
    "ppo": [("score", "reward-model score"), ("kl", "KL to reference"), ("reward", "shaped reward")],
}  # fmt: skip


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def stage_table(cfg: PipelineConfig, root: Path) -> list[dict[str, Any]]:
    """Per stage: wall time, steps, tokens seen, tokens/s, MFU (from the markers and metrics.jsonl)."""
    from llmlab.pipeline.markers import read_marker

    table = []
    for stage in cfg.stages:
        marker = read_marker(root, stage) or {}
        rows = [r for r in read_rows(root / stage / "metrics.jsonl") if r.get("split") == "train"]
        tokens = sum(r.get("tokens", 0) for r in rows)
        steps = rows[-1]["step"] if rows else None
        if rows and steps:  # rows are logged every log_every steps: scale the logged tokens to all steps
            tokens = tokens * steps / max(len(rows), 1) if len(rows) < steps else tokens
        tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
        mfu = [r["mfu"] for r in rows if r.get("mfu")]
        table.append({
            "stage": stage, "seconds": marker.get("seconds"), "steps": steps, "tokens": tokens or None,
            "tokens_per_s": sum(tps) / len(tps) if tps else None, "mfu": sum(mfu) / len(mfu) if mfu else None,
            "resumed": marker.get("resumed"), "config": marker.get("config", {}),
        })  # fmt: skip
    return table


# ------------------------------------------------------------------------------------------- plots
def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_losses(cfg: PipelineConfig, root: Path, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    stages = [s for s in cfg.stages if read_rows(root / s / "metrics.jsonl")]
    stages = [s for s in stages if any("loss" in r for r in read_rows(root / s / "metrics.jsonl"))]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 2.8), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = read_rows(root / stage / "metrics.jsonl")
        for split, style in (("train", "-"), ("val", "o-")):
            pts = [(r["step"], r["loss"]) for r in rows if r.get("split") == split and "loss" in r]
            if pts:
                ax.plot(*zip(*pts), style, label=split, ms=3)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss")
    return _save(fig, out / "loss_curves.png")


def plot_curves(root: Path, stage: str, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(root / stage / "metrics.jsonl") if r.get("split") == "train"]
    metrics = [(k, label) for k, label in CURVES[stage] if any(k in r for r in rows)]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 2.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
    return _save(fig, out / f"{stage}_curves.png")


def plot_eval(metrics: dict[str, Any], out: Path) -> Path | None:
    import matplotlib.pyplot as plt
    import numpy as np

    if not metrics:
        return None
    names = list(metrics)
    series = {
        "task exact match": [metrics[n]["results"]["tasks"]["exact_match"] for n in names],
        "format ok": [metrics[n]["results"]["tasks"]["format_ok"] for n in names],
        "win rate vs baseline": [
            next(
                (v["win_rate"] for k, v in metrics[n]["results"].items() if k.startswith("winrate_")), np.nan
            )
            for n in names
        ],
    }
    bpb = [metrics[n]["results"]["heldout_text"]["bits_per_byte"] for n in names]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw={"width_ratios": [2, 1]})
    x, w = np.arange(len(names)), 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=label)
    ax.set_xticks(x, names, rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("held-out tasks per stage")
    ax2.bar(x, bpb, 0.6, color="gray")
    comp = metrics[names[0]]["results"]["heldout_text"]
    for key, style in (("gzip-9_bpb", "--"), ("xz-9_bpb", ":")):
        if key in comp:
            ax2.axhline(comp[key], ls=style, color="k", lw=1, label=key.replace("_bpb", ""))
    ax2.set_xticks(x, names, rotation=20, fontsize=8)
    ax2.set_title("held-out bits per byte (lower is better)")
    ax2.legend(fontsize=7)
    return _save(fig, out / "eval_metrics.png")


# ------------------------------------------------------------------------------------------- pages
def _img(path: Path | None, alt: str) -> str:
    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _num(x: Any, fmt: str = "{:.3g}") -> str:
    return "-" if x is None else fmt.format(x) if isinstance(x, (int, float)) else str(x)


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """Three lines: what pretraining, SFT/DPO and RL/quantization changed, from the eval stage's numbers."""

    def res(n: str) -> dict[str, Any]:
        return metrics.get(n, {}).get("results", {})

    def em(n: str) -> str:
        return f"{100 * res(n)['tasks']['exact_match']:.1f}%" if res(n) else "-"

    def wr(n: str) -> str:
        r = res(n)
        w = next((v for k, v in r.items() if k.startswith("winrate_")), None)
        if not w:
            return ""
        text = (f"verifier win rate vs SFT {100 * w['win_rate']:.0f}% [{100 * w['ci_low']:.0f}, "
                f"{100 * w['ci_high']:.0f}] ({w['wins']} wins / {w['losses']} losses)")  # fmt: skip
        j = next((v for k, v in r.items() if k.startswith("rm_winrate_")), None)
        if j and j.get("winrate_ci95"):
            lo, hi = j["winrate_ci95"]
            text += f", reward-model win rate {100 * j['winrate']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
        return text

    lines = []
    first = next(iter(metrics), None)
    if first:
        t = res(first)["heldout_text"]
        lines.append(f"{first}: held-out {t['bits_per_byte']:.3f} bits/byte (gzip -9 {_num(t.get('gzip-9_bpb'))}, "
                     f"xz -9e {_num(t.get('xz-9_bpb'))}); task exact match {em(first)}")  # fmt: skip
    parts = [f"sft: exact match {em('sft')}"] if "sft" in metrics else []
    if "dpo" in metrics:
        parts.append(f"dpo: {em('dpo')}, {wr('dpo')}")
    if parts:
        lines.append("; ".join(parts))
    parts = [f"{s}: {em(s)}, {wr(s)}" for s in ("grpo", "ppo") if s in metrics]
    parts += [f"{n}: {em(n)}" for n in metrics if n.startswith("quantize-")]
    if parts:
        lines.append("; ".join(parts))
    return lines


def run_report(cfg: PipelineConfig, root: Path, out: Path, resume: bool) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from llmlab.pipeline.markers import read_marker

    metrics_file = root / "eval" / "metrics.json"
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
    if metrics_file.is_file():
        shutil.copy(metrics_file, out / "metrics.json")
    else:
        (out / "metrics.json").write_text("{}", encoding="utf-8")
    samples_file = root / "eval" / "samples.json"
    samples = json.loads(samples_file.read_text(encoding="utf-8")) if samples_file.is_file() else {}
    figures = [
        (plot_eval(metrics, out), "eval metrics per stage"),
        (plot_losses(cfg, root, out), "loss curves"),
    ]
    figures += [(plot_curves(root, s, out), f"{s} training curves") for s in CURVES if s in cfg.stages]
    analyses = run_analyses(cfg, root, out) if cfg.report.analysis else []
    table = stage_table(cfg, root)
    lines = summary_lines(metrics)
    stage_summaries = {s: (read_marker(root, s) or {}).get("summary") for s in cfg.stages}
    page = render_html(root, lines, figures, table, samples, analyses, metrics, stage_summaries)
    (out / "index.html").write_text(page, encoding="utf-8")
    (out / "report.md").write_text(
        render_md(root, lines, figures, table, samples, analyses), encoding="utf-8"
    )
    return {"summary": lines, "analyses": [a["name"] for a in analyses]}


def analysis_pairs(cfg: PipelineConfig, root: Path) -> list[tuple[str, Path, Path]]:
    """Each model stage against the model it started from (pretraining: its own init weights)."""
    source = {"sft": "pretrain" if not cfg.base else "base", "dpo": "sft"}
    rl = cfg.rl_from if cfg.rl_from in cfg.stages else "sft"
    source.update({"grpo": rl, "ppo": rl})
    paths = {s: root / s / "final" for s in MODEL_STAGES}
    paths["base"] = Path(cfg.base) if cfg.base else Path()
    pairs = (
        [("pretrain-init", root / "pretrain" / "init", paths["pretrain"])] if "pretrain" in cfg.stages else []
    )
    for stage in MODEL_STAGES[1:]:
        if stage in cfg.stages:
            pairs.append((f"{source[stage]}-to-{stage}", paths[source[stage]], paths[stage]))
    return pairs


def stage_adapter(cfg: PipelineConfig, root: Path, stage: str) -> Path | None:
    """The LoRA adapter a stage trained (its ``final`` is that adapter merged into its starting model)."""
    if stage == "sft" and cfg.sft.peft == "lora":
        return root / "sft"
    if stage in ("dpo", "grpo", "ppo") and getattr(cfg, stage).use_lora:
        return root / stage / "adapter"
    return None


def run_analyses(cfg: PipelineConfig, root: Path, out: Path) -> list[dict[str, Any]]:
    """``llmlab analyze`` per pair; a LoRA stage is analysed as its starting model + its adapter."""
    from tqdm.auto import tqdm

    from llmlab.analysis.analyze import analyze
    from llmlab.loading import resolve_model_path

    results = []
    for name, before, after in tqdm(
        analysis_pairs(cfg, root), desc="analyze", unit="pair", dynamic_ncols=True
    ):
        before = resolve_model_path(before)
        adapter = stage_adapter(cfg, root, name.rsplit("-to-", 1)[-1]) if "-to-" in name else None
        target = before if adapter is not None else after
        res = analyze(
            before, target, out / "analysis" / name, adapter=adapter, n_prompts=cfg.report.analysis_prompts
        )
        results.append({"name": name, "dir": out / "analysis" / name, **res})
    return results


def render_html(root, lines, figures, table, samples, analyses, metrics, stage_summaries) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(t['stage'])}</td><td>{_num(t['seconds'], '{:.0f}')}</td><td>{_num(t['steps'])}</td>"
        f"<td>{_num(t['tokens'], '{:,.0f}')}</td><td>{_num(t['tokens_per_s'], '{:,.0f}')}</td>"
        f"<td>{_num(None if t['mfu'] is None else 100 * t['mfu'], '{:.1f}%')}</td>"
        f"<td>{'yes' if t['resumed'] else ''}</td></tr>"
        for t in table
    )
    models = list(samples.get("answers", {}))
    sample_rows = "".join(
        f"<tr><td>{e(p)}</td>" + "".join(f"<td>{e(samples['answers'][m][i])}</td>" for m in models) + "</tr>"
        for i, p in enumerate(samples.get("prompts", []))
    )
    figs = "".join(_img(p, alt) for p, alt in figures)
    ana = "".join(
        f"<h3>{e(a['name'])}</h3><p>{e(a['summary'])}</p><p>{e(a['attention_summary'])}</p>"
        + "".join(_img(a["dir"] / f, f"{a['name']}: {f}") for f in a.get("figures", []))
        for a in analyses
    )
    configs = "".join(
        f"<details><summary>{e(t['stage'])} config</summary><pre>{e(json.dumps(t['config'], indent=1))}</pre>"
        f"<pre>{e(json.dumps(stage_summaries.get(t['stage']), indent=1, default=str)[:4000])}</pre></details>"
        for t in table
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>llmlab pipeline report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}}img{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top}}
figure{{margin:0.5em 0}}figcaption{{font-size:12px;color:#555}}</style></head><body>
<h1>llmlab pipeline report</h1><p>run directory: <code>{e(str(root))}</code></p>
<h2>What each stage changed</h2><ul>{"".join(f"<li>{e(x)}</li>" for x in lines)}</ul>
<h2>Plots</h2>{figs}
<h2>Samples (greedy, same prompts)</h2><table><tr><th>prompt</th>{"".join(f"<th>{e(m)}</th>" for m in models)}</tr>{sample_rows}</table>
<h2>Stages</h2><table><tr><th>stage</th><th>wall s</th><th>steps</th><th>tokens</th><th>tokens/s</th><th>MFU</th><th>resumed</th></tr>{rows}</table>
<h2>Stage analysis</h2>{ana}
<h2>Configs and summaries</h2>{configs}
<h2>Metrics (harness JSON shape)</h2><pre>{e(json.dumps(metrics, indent=1)[:20000])}</pre>
</body></html>"""


def render_md(root, lines, figures, table, samples, analyses) -> str:
    out = [f"# llmlab pipeline report\n\nrun directory: `{root}`\n\n## What each stage changed\n"]
    out += [f"- {x}" for x in lines]
    out.append(
        "\n## Stages\n\n| stage | wall s | steps | tokens | tokens/s | MFU |\n|---|---|---|---|---|---|"
    )
    for t in table:
        mfu = None if t["mfu"] is None else 100 * t["mfu"]
        out.append(f"| {t['stage']} | {_num(t['seconds'], '{:.0f}')} | {_num(t['steps'])} | {_num(t['tokens'], '{:,.0f}')} "
                   f"| {_num(t['tokens_per_s'], '{:,.0f}')} | {_num(mfu, '{:.1f}%')} |")  # fmt: skip
    out.append("\n## Plots\n")
    out += [f"![{alt}]({p.name})" for p, alt in figures if p is not None]
    models = list(samples.get("answers", {}))
    if models:
        out.append("\n## Samples\n\n| prompt | " + " | ".join(models) + " |\n|" + "---|" * (len(models) + 1))
        for i, p in enumerate(samples["prompts"]):
            cells = [samples["answers"][m][i].replace("|", "\\|") for m in models]
            out.append(f"| {p} | " + " | ".join(cells) + " |")
    out.append("\n## Stage analysis\n")
    for a in analyses:
        out.append(f"### {a['name']}\n\n{a['summary']}\n\n{a['attention_summary']}\n")
        out += [f"![{f}](analysis/{a['name']}/{f})" for f in a.get("figures", [])]
    return "\n".join(out) + "\n"


__all__ = ["STAGES", "run_report"]
