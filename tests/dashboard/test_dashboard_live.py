"""The dashboard of a live server: admin actions move the real round engine, and what the
gRPC clients do (uploads, refusals, downloads) shows in the API and the metrics."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

import grpc
import httpx
import pytest

from live_federation import (
    ADMIN,
    LiveServer,
    close_clients,
    get,
    live_settings,
    make_clients,
    refused_upload,
    train_and_upload,
    wait_for,
)
from wire import running_server, synthetic_adapter

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def post(server: LiveServer, action: str) -> httpx.Response:
    return httpx.post(f"{server.url}/api/v1/runs/current/{action}", headers=AUTH, timeout=30.0)


@pytest.fixture
def server(tmp_path: Path) -> LiveServer:
    live = LiveServer(live_settings(tmp_path, min_clients=1, rounds=2), evaluate=False)
    yield live
    live.stop()


def overview(server: LiveServer) -> dict:
    return get(server, "/api/v1/runs/current")


def test_admin_actions_drive_the_round_engine(server: LiveServer) -> None:
    assert post(server, "pause").status_code == 200
    assert overview(server)["paused"] and overview(server)["activity"] == "waiting"
    alice, bob = server.call(make_clients(server.address, ("alice", "bob")))
    server.call(alice.enroll(host="a"))
    server.call(bob.enroll(host="b"))
    waiting = server.call(bob.get_task(max_wait_s=0.2))
    assert waiting.WhichOneof("task") == "wait" and "paused" in waiting.wait.reason
    assert post(server, "close-round").status_code == 409  # no round is open

    assert post(server, "resume").status_code == 200
    wait_for(lambda: overview(server)["current_round"] == 0, "round 0 to open")
    assert overview(server)["clients_sampled"] == 2 and overview(server)["activity"] == "training"
    early = post(server, "close-round")
    assert early.status_code == 409 and "no update" in early.json()["detail"]

    task = server.call(alice.get_task()).train
    server.call(train_and_upload(alice, task, 0, loss=1.25))
    assert post(server, "pause").status_code == 200
    assert post(server, "close-round").json()["action"] == "close-round"
    wait_for(lambda: get(server, "/api/v1/runs/current/rounds")[0]["phase"] == "closed",
             "round 0 to close")  # fmt: skip
    closed = get(server, "/api/v1/runs/current/rounds/0")
    assert closed["reporters"] == ["alice"] and closed["train_loss"] == 1.25
    assert overview(server)["activity"] == "waiting" and overview(server)["current_round"] == 0

    assert server.call(refused_upload(alice)) == grpc.StatusCode.FAILED_PRECONDITION
    assert post(server, "clients/bob/revoke").status_code == 200
    assert post(server, "clients/zed/revoke").status_code == 404
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        server.call(bob.heartbeat(0))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    clients = {c["name"]: c for c in get(server, "/api/v1/runs/current/clients")}
    assert clients["bob"]["status"] == "revoked"
    assert clients["alice"]["last_upload_refused"]
    assert clients["alice"]["refusal_reason"] == "FAILED_PRECONDITION"
    assert clients["alice"]["bytes_down"] > 0 and clients["alice"]["bytes_up"] > 0

    assert post(server, "resume").status_code == 200
    task = server.call(alice.get_task()).train
    assert task.round == 1
    server.call(train_and_upload(alice, task, 0, loss=0.75))
    wait_for(lambda: overview(server)["activity"] == "done", "the run to finish")
    done = server.call(alice.get_task()).done
    latest = get(server, "/api/v1/runs/current/adapters/latest")
    assert latest["name"] == "round-1" and latest["sha256"] == done.final_adapter.sha256
    weights = httpx.get(server.url + latest["safetensors_url"], timeout=30.0).content
    assert hashlib.sha256(weights).hexdigest() == done.final_adapter.sha256
    assert post(server, "pause").status_code == 409  # the run is over

    metrics = httpx.get(f"{server.url}/metrics", timeout=30.0).text
    run_id = overview(server)["run"]["run_id"]
    assert f'fedrot_refused_uploads_total{{reason="FAILED_PRECONDITION",run="{run_id}"}} 1.0' in metrics
    assert f'fedrot_rounds_completed{{run="{run_id}"}} 2.0' in metrics
    server.call(close_clients([alice, bob]))


def test_health_is_open_and_admin_needs_its_token(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/healthz", timeout=30.0).json()["status"] == "ok"
    refused = httpx.post(f"{server.url}/api/v1/runs/current/pause", timeout=30.0)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthenticated"
    assert not overview(server)["paused"]


def test_bound_dashboard_port_is_logged_and_freed_on_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedrot_server")

    async def scenario() -> int:
        async with running_server(live_settings(tmp_path), synthetic_adapter()) as started:
            port = started.dashboard_port
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        return port

    port = asyncio.run(scenario())
    assert f"dashboard on port {port}" in caplog.text
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5.0)


def test_no_dashboard_when_its_listen_setting_is_empty(tmp_path: Path) -> None:
    async def scenario() -> int | None:
        async with running_server(live_settings(tmp_path, dashboard_listen=""), synthetic_adapter()) as started:
            return started.dashboard_port

    assert asyncio.run(scenario()) is None


def test_clients_show_their_heartbeat_progress_in_the_open_round(server: LiveServer) -> None:
    alice, bob = server.call(make_clients(server.address, ("alice", "bob")))
    server.call(alice.enroll(host="a"))
    server.call(bob.enroll(host="b"))
    wait_for(lambda: overview(server)["current_round"] == 0, "round 0 to open")
    task = server.call(alice.get_task()).train
    server.call(alice.heartbeat(task.round))  # training, half done
    clients = {c["name"]: c for c in get(server, "/api/v1/runs/current/clients")}
    assert clients["alice"]["phase"] == "training" and clients["alice"]["progress"] == 0.5
    assert clients["alice"]["progress_at"] is not None
    assert clients["bob"]["phase"] is None  # no heartbeat yet
    server.call(alice.heartbeat(task.round, phase=1))  # CLIENT_PHASE_IDLE
    clients = {c["name"]: c for c in get(server, "/api/v1/runs/current/clients")}
    assert clients["alice"]["phase"] == "idle"

    server.call(train_and_upload(alice, task, 0, loss=1.0))
    server.call(train_and_upload(bob, server.call(bob.get_task()).train, 0, loss=1.0))
    wait_for(lambda: overview(server)["current_round"] == 1, "round 1 to open")
    clients = {c["name"]: c for c in get(server, "/api/v1/runs/current/clients")}
    assert clients["alice"]["phase"] is None  # its heartbeat was about round 0
    server.call(close_clients([alice, bob]))
