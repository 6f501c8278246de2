"""A simulation's files: ``metrics.json`` (config, summary, rounds), ``metrics.csv`` (a row per
round) and ``curves.png``. Written after every round, so an interrupted run leaves its rounds."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedrot_client.simulation.engine import RoundMetrics

logger = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
CSV_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(RoundMetrics))


def write_json_atomic(path: Path, content: Mapping[str, Any]) -> None:
    """Write JSON through a temporary file and a rename (a reader never sees half a file)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(temporary, path)


def write_metrics(
    out_dir: Path,
    config: Mapping[str, Any],
    rounds: Sequence[RoundMetrics],
    summary: Mapping[str, Any] | None = None,
) -> None:
    """``metrics.json`` and ``metrics.csv`` for the rounds so far (``summary`` once done)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    content = {"config": dict(config), "summary": None if summary is None else dict(summary),
               "rounds": [r.to_dict() for r in rounds]}  # fmt: skip
    write_json_atomic(out_dir / METRICS_JSON, content)
    with (out_dir / METRICS_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for metrics in rounds:
            writer.writerow(metrics.to_dict())


def read_metrics(path: Path) -> dict[str, Any]:
    """A ``metrics.json`` as written by :func:`write_metrics`."""
    return json.loads(Path(path).read_text())
