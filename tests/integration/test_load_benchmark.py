"""benchmarks/load.py keeps working: a small load (5 clients x 2 rounds) against a real server
subprocess completes without errors and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LOAD = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"


def test_a_small_load_run_has_no_errors_and_reports_its_figures() -> None:
    done = subprocess.run(
        [sys.executable, str(LOAD), "--clients", "5", "--rounds", "2", "--json", "--timeout", "120"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert (result["clients"], result["rounds"], result["errors"]) == (5, 2, 0), result
    assert result["uploads"] == 10 and result["error_kinds"] == {}
    assert 0 < result["upload_p50_ms"] <= result["upload_p99_ms"] <= result["upload_max_ms"]
    assert 0 < result["server_rss_serving_mib"] <= result["server_peak_rss_mib"]
    assert result["rounds_per_minute"] > 0 and result["server_round_mean_s"] > 0
    assert result["payload_bytes"] > 0
