"""benchmarks/aggregation.py keeps working: one quick pass on the smaller shape reports every
key, the tracked rounds included (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "aggregation.py"


def test_one_pass_reports_every_key() -> None:
    command = [sys.executable, str(SCRIPT), "--shapes", "roberta_large", "--repeats", "1",
               "--clients-tracked", "2,3", "--json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)["roberta_large"]
    times = ["fedrot_s", "loop_s", "fedit_s", "fedit_streaming_s", "plain_inplace_s",
             "gemm_floor_s", "gemm_floor_exact_s", "fedrot_tracked_s", "fedrot_tracked_s_n2",
             "fedrot_tracked_s_n3"]  # fmt: skip
    peaks = ["peak_mb_n5", "peak_mb_n50", "peak_mb_n2_tracked", "peak_mb_n3_tracked"]
    assert all(row[key] > 0 for key in times + peaks), row
    assert row["ratio_vs_plain"] == row["fedrot_s"] / row["plain_inplace_s"]
    assert row["ratio_vs_fedit"] == row["fedrot_s"] / row["fedit_s"]
    assert row["ratio_vs_floor_exact"] == row["fedrot_s"] / row["gemm_floor_exact_s"]
    assert row["max_rel_diff_vs_loop"] < 1e-5
    # roberta_large: 48 modules of rank 4, 1024 x 1024; a client's factors, float32
    per_client_mb = 48 * 4 * (1024 + 1024) * 4 / 2**20
    assert row["scratch_mb_n2_tracked"] == 2 * per_client_mb
    assert row["scratch_mb_n3_tracked"] == 3 * per_client_mb
