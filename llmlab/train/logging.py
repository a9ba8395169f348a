"""Run logging: ``metrics.jsonl`` (one JSON object per line), TensorBoard scalars, and a loss-curve PNG.

Only rank 0 logs; other ranks get a disabled logger, so call sites need no rank checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"


class MetricsLogger:
    """Append-only JSONL metrics plus optional TensorBoard event files under ``out_dir/tb``."""

    def __init__(self, out_dir: str | Path | None, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled and out_dir is not None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._fh = None
        self._tb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file (rows after the resume point are re-logged).
        self._fh = open(self.out_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"))
            except ImportError:  # tensorboard is a dependency, but logging must never kill a run
                self._tb = None

    @property
    def path(self) -> Path | None:
        return self.out_dir / METRICS_FILE if self.out_dir is not None else None

    def reset(self) -> None:
        """Start the metrics file afresh (a new run in a reused directory; a resumed run appends)."""
        if self.enabled:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            (self.out_dir / METRICS_FILE).unlink(missing_ok=True)

    def _file(self):
        if self._fh is None:  # reopened after close(): a trainer may keep stepping after fit()
            self._fh = open(self.out_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        return self._fh

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": prefix, "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        fh = self._file()
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def event(self, step: int, name: str, **info: Any) -> None:
        """A discrete event (skipped step, rollback, checkpoint) in the same JSONL stream."""
        if not self.enabled:
            return
        row = {"step": step, "event": name, "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in info.items()})
        fh = self._file()
        fh.write(json.dumps(row) + "\n")
        fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    if hasattr(v, "item"):
        return _jsonable(v.item())
    return v


def jsonable(obj: Any) -> Any:
    """A run report made JSON-safe: keys as strings, tuples as lists, NaN/inf as null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def config_dict(cfg: Any) -> dict[str, Any]:
    """A (nested) dataclass config as a JSON-safe dict: what checkpoints' ``config.json`` and reports record."""
    return json.loads(json.dumps(jsonable(dataclasses.asdict(cfg)), default=str))


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write a stage's run report as indented JSON (made safe by :func:`jsonable`), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(report), indent=2, default=str), encoding="utf-8")
    return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Train (and val, if logged) loss against step; the last logged value wins for repeated steps."""
    import matplotlib  # optional: only the loss plot needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for row in read_metrics(metrics_path):
        loss = row.get("loss")
        if not isinstance(loss, (int, float)):
            continue
        (val if row.get("split") == "val" else train if row.get("split") == "train" else {})[row["step"]] = (
            loss
        )
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps = sorted(train)
        ax.plot(steps, [train[s] for s in steps], label="train loss", lw=1.2)
    if val:
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
