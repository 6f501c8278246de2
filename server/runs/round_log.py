"""The per-round summary: what the server logs, stores and writes to ``report.json``.

Plain JSON data only (names, counts, bytes, errors, seconds, metrics); never tokens or
tensor contents.

The error and drift keys (see :mod:`fedrot.diagnostics` and :mod:`fedrot.drift`):

- ``aggregation_error`` / ``relative_aggregation_error``: the round's own error, as published;
- ``fedit_aggregation_error`` / ``fedit_relative_aggregation_error``: the error plain FedIT
  averaging would have had for the same uploads (equal to the round's own under FedIT), and
  ``error_removed_share = 1 - aggregation_error / fedit_aggregation_error``;
- ``factor_average_error``: the error of averaging the factors *after* the round's gauge,
  which under FedRot is its own error again, not FedIT's (kept for old readers);
- ``rotation_drift_share``: the share of the clients' drift from the reference,
  ``sum_i p_i ||X_i - X_ref||^2`` of the aligned factor summed over modules, that the optimal
  rotations remove; ``applied_rotation_drift_share`` the same for the rotation applied (soft,
  ``lambda < 1``). None in rounds that do not align. Per-module values are in report.json's
  ``aggregation.rotation_drift``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedrot_server.storage.state import UploadRow
from fedrot_server.runs.worker import FinishedRound


def weighted_metrics(uploads: Sequence[UploadRow]) -> dict[str, float]:
    """Per metric name, the sample-weighted mean over the uploads that reported it."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for upload in uploads:
        for name, value in upload.metrics.items():
            sums[name] = sums.get(name, 0.0) + upload.sample_count * value
            weights[name] = weights.get(name, 0.0) + upload.sample_count
    return {name: sums[name] / weights[name] for name in sorted(sums) if weights[name] > 0}


def round_summary(
    participants: Iterable[str],
    uploads: Sequence[UploadRow],
    finished: FinishedRound,
    *,
    bytes_out: int,
    seconds: float,
    extensions: int,
    evaluating: bool = False,
) -> dict[str, Any]:
    """The closing figures of a round; ``evaluating``: its held-out scores come later (see
    :func:`with_evaluation`)."""
    report = finished.result.report
    return {
        "round": report.round_index,
        "strategy": str(report.strategy),
        "aligned": None if report.aligned is None else str(report.aligned),
        "participants": sorted(participants),
        "reporters": [u.client for u in uploads],
        "samples": sum(u.sample_count for u in uploads),
        "bytes_in": sum(u.size_bytes for u in uploads),
        "bytes_out": bytes_out,
        "adapter_bytes": finished.encoded.size,
        "aggregation_error": _number(report.aggregation_error),
        "relative_aggregation_error": _number(report.relative_aggregation_error),
        "factor_average_error": _number(report.factor_average_error),
        "fedit_aggregation_error": _number(report.fedit_aggregation_error),
        "fedit_relative_aggregation_error": _number(report.fedit_relative_aggregation_error),
        "error_removed_share": _number(report.error_removed_share),
        "rotation_drift_share": _number(report.rotation_drift_share),
        "applied_rotation_drift_share": _number(report.applied_rotation_drift_share),
        "client_metrics": weighted_metrics(uploads),
        "evaluation": {},
        "evaluating": evaluating,
        "duration_s": round(seconds, 3),
        "aggregation_s": round(finished.seconds, 3),
        "extensions": extensions,
    }


def with_evaluation(
    summary: Mapping[str, Any], scores: Mapping[str, float], seconds: float
) -> dict[str, Any]:
    """``summary`` with the round's held-out ``scores`` (empty: the evaluation failed) and the
    seconds the evaluation took."""
    return {**summary, "evaluation": dict(scores), "evaluating": False,
            "evaluation_s": round(seconds, 3)}  # fmt: skip


def _number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def mean_rotation_distance(rotations: Iterable[Any]) -> str:
    """The mean ``rotation_distance`` of a client's per-module rotation statistics, for logs."""
    distances = [r.rotation_distance for r in rotations if r.rotation_distance is not None]
    return f"{sum(distances) / len(distances):.4g}" if distances else "n/a"
