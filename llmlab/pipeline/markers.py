"""The pipeline's done-markers (``DIR/.pipeline/<stage>.json``) and started-markers, read and written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER_DIR = ".pipeline"


def marker_path(root: Path, stage: str, started: bool = False) -> Path:
    return Path(root) / MARKER_DIR / f"{stage}{'.started' if started else ''}.json"


def read_marker(root: Path, stage: str, started: bool = False) -> dict[str, Any] | None:
    """A stage's marker, or None when missing or unreadable (a half-written marker counts as none)."""
    try:
        return json.loads(marker_path(root, stage, started).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON through a temporary file and a rename, so a kill never leaves half a marker."""
    from llmlab.train.logging import jsonable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2), encoding="utf-8")
    tmp.replace(path)
