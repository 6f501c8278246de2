"""benchmarks/gemm_shapes.py keeps working: one quick pass prints every rate, all positive (no
timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gemm_shapes.py"


def test_one_pass_reports_every_shape() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "1", "--json"],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rates = json.loads(done.stdout)
    assert set(rates) == {
        "blas_square_512", "blas_cross", "blas_rotate_a", "blas_rotate_b",
        "onednn_square_512", "onednn_rotate_b", "blas_three_gemms_64_modules",
    }  # fmt: skip
    assert all(rate > 0 for rate in rates.values())
