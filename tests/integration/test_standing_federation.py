"""One standing server, two runs submitted over its admin API, the same two client daemons.

The daemons (real ``python -m fedrot_client.main`` processes) start once, before any run
exists: they wait, join the first run, hear DONE with ``server_continues``, and join the second
(another strategy and rank) without a restart. After both runs, the first run's adapters still
download from the dashboard.
"""

from __future__ import annotations

import hashlib
import signal
import time
from pathlib import Path

import httpx

from fedrot_server.main import standing_seams
from fedrot_server.service import start_server
from harness import Clients, ServerThread, client_shards, tiny_settings

ADMIN = "admin-token-for-standing-0123"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


class StandingServer(ServerThread):
    """A ``--standing`` server with its dashboard on 127.0.0.1 port 0 and the production seams."""

    def __init__(self, state_dir: Path) -> None:
        settings = tiny_settings(state_dir, standing=True, dashboard_listen="127.0.0.1:0",
                                 admin_token=ADMIN, min_clients=2)  # fmt: skip
        self.settings = settings
        self._start_loop()
        initializer, evaluator_for = standing_seams()
        self.server = self.call(start_server(settings, initializer=initializer,
                                             evaluator_for=evaluator_for))  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.dashboard_port}/api/v1"


def run_body(**overrides: object) -> dict[str, object]:
    """A 2-round tiny-BERT run for alice and bob (the harness's model, 4 classes)."""
    body: dict[str, object] = {
        "model": {"name": "tiny-bert", "num_labels": 4, "seed": 0},
        "lora": {"rank": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ["query", "value"]},
        "training": {"local_steps": 2, "batch_size": 8, "learning_rate": 0.05, "max_length": 32},
        "rounds": 2, "min_clients": 2, "round_deadline_s": 120.0,
    }  # fmt: skip
    body.update(overrides)
    return body


def wait_for_phase(server: StandingServer, run_id: str, phase: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = {r["run_id"]: r for r in httpx.get(f"{server.url}/runs", timeout=30).json()}
        if runs[run_id]["phase"] == phase:
            return
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not reach {phase} in {timeout_s} s: {runs[run_id]}")


def test_one_standing_server_runs_two_submitted_runs_with_the_same_daemons(
    tmp_path: Path, clients: Clients
) -> None:
    server = StandingServer(tmp_path / "state")
    try:
        shards = client_shards(tmp_path / "data", [24, 24])
        daemons = [clients.start(name, server.address, shard, extra=["--max-wait-s", "2"])
                   for name, shard in zip(("alice", "bob"), shards)]  # fmt: skip
        time.sleep(2)  # the daemons are up, and wait: there is no run yet
        assert all(d.process.poll() is None for d in daemons)

        submitted = [httpx.post(f"{server.url}/runs", json=body, headers=AUTH, timeout=30)
                     for body in (run_body(), run_body(strategy={"name": "fedit"},
                                                       lora={"rank": 4, "alpha": 8.0}))]  # fmt: skip
        assert [r.status_code for r in submitted] == [201, 201], [r.text for r in submitted]
        first, second = (r.json()["run_id"] for r in submitted)
        listed = {r["run_id"]: r for r in httpx.get(f"{server.url}/runs", timeout=30).json()}
        assert listed[second]["phase"] == "queued"

        wait_for_phase(server, first, "finished", 300)
        wait_for_phase(server, second, "finished", 300)
        for daemon in daemons:  # still serving: they follow the server's runs
            assert daemon.process.poll() is None, daemon.log()
        for run_id in (first, second):
            rounds = httpx.get(f"{server.url}/runs/{run_id}/rounds", timeout=30).json()
            assert [sorted(r["reporters"]) for r in rounds] == [["alice", "bob"]] * 2

        latest = httpx.get(f"{server.url}/runs/{first}/adapters/latest", headers=AUTH,
                           timeout=30).json()  # fmt: skip
        base = f"http://127.0.0.1:{server.server.dashboard_port}"
        weights = httpx.get(base + latest["safetensors_url"], timeout=30)
        assert weights.status_code == 200
        assert hashlib.sha256(weights.content).hexdigest() == latest["sha256"]

        for daemon in daemons:
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.wait(60) == 0, daemon.log()
            log = daemon.log()
            assert first in log and second in log
    finally:
        server.stop()
