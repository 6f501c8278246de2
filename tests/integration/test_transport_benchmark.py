"""benchmarks/transport.py keeps working: on a tiny adapter it starts a real server, moves the
update up and the adapter down through the client's transport and raw TCP, and reports every
figure (not timed: the numbers are only checked to be there and consistent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TRANSPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "transport.py"
KEYS = ("grpc_upload_mb_s", "tcp_upload_mb_s", "upload_ratio", "grpc_download_mb_s",
        "tcp_download_mb_s", "download_ratio", "tcp_durable_upload_mb_s")  # fmt: skip


def test_a_tiny_transfer_run_reports_its_figures() -> None:
    done = subprocess.run(
        [sys.executable, str(TRANSPORT), "--layers", "2", "--d", "64", "--rank", "4",
         "--repeats", "2", "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert all(result[key] > 0 for key in KEYS), result
    assert result["upload_ratio"] == result["tcp_upload_mb_s"] / result["grpc_upload_mb_s"]
    assert result["download_ratio"] == result["tcp_download_mb_s"] / result["grpc_download_mb_s"]
    # 2 layers x (q, v) x (A (4, 64) + B (64, 4)) + head (2, 64), float32, plus the header
    assert 4 * (4 * 2 * 4 * 64 + 2 * 64) < result["upload_bytes"] < 20_000
    assert result["download_bytes"] > 4 * (4 * 2 * 4 * 64 + 2 * 64)
    assert result["repeats"] == 2 and result["chunk_bytes"] == 1024 * 1024
