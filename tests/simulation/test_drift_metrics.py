"""``fedrot simulate``'s per-round diagnostics: the rotation drift share and FedIT's error for
the same uploads, in RoundMetrics, metrics.json and metrics.csv."""

from __future__ import annotations

import csv
import json

import pytest

from fedrot_client.simulation import run_simulation
from fedrot_client.simulation.command import simulate_to
from simulation_fixtures import tiny_config

DIAGNOSTICS = ("fedit_aggregation_error", "fedit_relative_aggregation_error", "error_removed_share",
               "rotation_drift_share", "applied_rotation_drift_share")  # fmt: skip


def test_fedrot_rounds_record_the_drift_share_and_fedits_error(tmp_path, federation):
    result = simulate_to(tmp_path, tiny_config(rounds=3, lam=0.4), federation)
    content = json.loads((tmp_path / "metrics.json").read_text())
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for record, row in zip(content["rounds"], rows, strict=True):
        assert set(DIAGNOSTICS) <= set(record) and set(DIAGNOSTICS) <= set(row)
    first, *aligned = result.rounds
    assert first.aligned is None and first.rotation_drift_share is None
    assert first.fedit_aggregation_error == first.factor_average_error
    for metrics in aligned:
        assert 0.0 < metrics.rotation_drift_share <= 1.0
        assert metrics.applied_rotation_drift_share < metrics.rotation_drift_share
        assert metrics.fedit_aggregation_error > 0.0
        assert metrics.error_removed_share == pytest.approx(
            1.0 - metrics.aggregation_error / metrics.fedit_aggregation_error
        )
    assert float(rows[1]["rotation_drift_share"]) == pytest.approx(aligned[0].rotation_drift_share)
    summary = content["summary"]
    assert summary["mean_rotation_drift_share"] == pytest.approx(
        sum(m.rotation_drift_share for m in aligned) / len(aligned)
    )
    assert summary["mean_fedit_relative_aggregation_error"] is not None


def test_fedit_rounds_record_their_own_error_and_no_drift(federation):
    result = run_simulation(tiny_config(strategy="fedit", rounds=2), federation)
    for metrics in result.rounds:
        assert metrics.rotation_drift_share is None
        own = metrics.aggregation_error
        assert metrics.fedit_aggregation_error == pytest.approx(own, rel=1e-12)
        assert metrics.error_removed_share == pytest.approx(0.0, abs=1e-12)
    assert result.summary()["mean_rotation_drift_share"] is None
