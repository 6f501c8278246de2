"""The dashboard's JSON API over a real SQLite state (TestClient, no server process)."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from dashboard_state import (
    INSTRUCT_EVALUATION,
    INSTRUCT_RUN,
    RUN,
    T0,
    FakeControl,
    RecordedRun,
    record_instruction_run,
    record_run,
    serve_recorded,
    sha256,
)
from fedrot_server.runs.control import Activity
from fedrot_server.dashboard import __main__ as standalone
from fedrot_server.dashboard import create_app
from fedrot_server.dashboard.files import AdapterFiles, ZipCache
from fedrot_server.storage.store import open_reader

NOW = T0 + 80.0  # round 1 (deadline T0 + 110) is open; alice was seen at T0 + 60
ADMIN = "admin-token-0123456789"
READ = "read-token-0123456789"


@pytest.fixture
def recorded(tmp_path: Path) -> RecordedRun:
    return record_run(tmp_path / "state")


def make_client(run: RecordedRun, **kwargs: object) -> Iterator[TestClient]:
    return serve_recorded(run, NOW, client_timeout_s=30.0, **kwargs)


@pytest.fixture
def client(recorded: RecordedRun) -> Iterator[TestClient]:
    yield from make_client(recorded)


def test_overview_of_the_current_run(client: TestClient) -> None:
    body = client.get("/api/v1/runs/current").json()
    assert body["run"]["run_id"] == RUN and body["run"]["rounds_total"] == 3
    assert body["run"]["rounds_completed"] == 1
    assert (body["base_model"], body["strategy"], body["alignment_strength"]) == ("tiny-bert", "fedrot", 0.4)
    assert body["current_round"] == 1 and body["round_phase"] == "open"
    assert body["activity"] == "training" and body["live"] is False
    assert body["deadline"] == T0 + 110 and body["seconds_left"] == pytest.approx(30.0)
    assert (body["clients_sampled"], body["clients_reported"], body["clients_enrolled"]) == (3, 1, 3)
    assert client.get(f"/api/v1/runs/{RUN}").json() == body


def test_clients_show_traffic_loss_rotation_and_refusals(client: TestClient) -> None:
    clients = {c["name"]: c for c in client.get(f"/api/v1/runs/{RUN}/clients").json()}
    alice, bob, carol = clients["alice"], clients["bob"], clients["carol"]
    assert (alice["status"], bob["status"], carol["status"]) == ("reported", "training", "revoked")
    assert (alice["rounds_joined"], alice["rounds_reported"], carol["rounds_joined"]) == (2, 2, 1)
    assert (alice["samples"], alice["bytes_up"], alice["bytes_down"]) == (22, 2100, 2500)
    assert alice["last_train_loss"] == 0.9 and bob["last_train_loss"] == 0.5
    assert alice["rotation_distance"] == pytest.approx(0.4) and alice["rotation_distance_max"] == 0.5
    assert alice["rotation_round"] == 0 and carol["rotation_distance"] is None
    assert not alice["last_upload_refused"]
    assert bob["last_upload_refused"] and bob["refusal_reason"] == "INVALID_ARGUMENT"
    assert bob["refusal_detail"] == "sha256 mismatch"
    assert alice["info"] == {"host": "h0"}


def test_rounds_closed_and_open(client: TestClient) -> None:
    rounds = client.get(f"/api/v1/runs/{RUN}/rounds").json()
    closed, live = rounds
    assert closed["phase"] == "closed" and closed["train_loss"] == 0.75
    assert closed["accuracy"] == 0.625 and closed["aggregation_error"] == 0.02
    assert closed["exact_match"] is None and closed["perplexity"] is None  # classification
    assert (closed["bytes_in"], closed["bytes_out"], closed["duration_s"]) == (4000, 2500, 30.0)
    assert live["phase"] == "open" and live["reporters"] == ["alice"]
    assert live["train_loss"] == 0.9 and live["bytes_in"] == 1100 and live["accuracy"] is None
    assert client.get(f"/api/v1/runs/{RUN}/rounds/1").json() == live


def test_rounds_of_an_instruction_run_carry_exact_match_and_perplexity(tmp_path: Path) -> None:
    for client in make_client(record_instruction_run(tmp_path / "state")):
        rounds = client.get(f"/api/v1/runs/{INSTRUCT_RUN}/rounds").json()
        assert [(r["exact_match"], r["perplexity"]) for r in rounds] == list(INSTRUCT_EVALUATION)
        assert all(r["accuracy"] is None for r in rounds)
        last = rounds[-1]
        assert last["evaluation"] == {"exact_match": 0.5, "perplexity": 6.25,
                                      "loss": pytest.approx(math.log(6.25))}  # fmt: skip
        assert client.get(f"/api/v1/runs/{INSTRUCT_RUN}/rounds/2").json() == last
        schema = client.get("/api/v1/openapi.json").json()["components"]["schemas"]["RoundInfo"]
        assert {"exact_match", "perplexity"} <= set(schema["required"])


def test_per_module_view_of_the_latest_closed_round(client: TestClient) -> None:
    body = client.get(f"/api/v1/runs/{RUN}/modules").json()
    assert body["round"] == 0 and body["aligned"] == "A"
    errors = [m["aggregation_error"] for m in body["modules"]]
    rotations = [m["rotation_distance"] for m in body["modules"]]
    assert errors == pytest.approx([0.01, 0.02]) and rotations == pytest.approx([0.2, 0.35])


def test_adapters_listed_and_downloaded_with_their_sha256(client: TestClient, recorded: RecordedRun) -> None:
    listed = client.get(f"/api/v1/runs/{RUN}/adapters").json()
    assert [a["name"] for a in listed] == ["initial", "round-0"]
    latest = client.get(f"/api/v1/runs/{RUN}/adapters/latest").json()
    assert latest == listed[1] and latest["sha256"] == sha256(recorded.weights[0])
    raw = client.get(latest["safetensors_url"])
    assert raw.status_code == 200 and raw.content == recorded.weights[0]
    assert raw.headers["x-content-sha256"] == latest["sha256"]
    archive = zipfile.ZipFile(io.BytesIO(client.get(latest["zip_url"]).content))
    names = sorted(archive.namelist())
    assert names == [f"{RUN}-round-0/adapter_config.json", f"{RUN}-round-0/adapter_model.safetensors"]
    assert archive.read(names[1]) == recorded.weights[0]
    initial = client.get(f"/api/v1/runs/{RUN}/adapters/initial/safetensors").content
    assert initial == recorded.weights[None]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/v1/runs/run-nope", 404),
        (f"/api/v1/runs/{RUN}/rounds/7", 404),
        (f"/api/v1/runs/{RUN}/rounds/seven", 422),
        (f"/api/v1/runs/{RUN}/adapters/1/zip", 404),  # round 1 is still open
        (f"/api/v1/runs/{RUN}/adapters/newest", 422),
        (f"/api/v1/runs/{RUN}/adapters/\u00b2/zip", 422),  # a digit to str.isdigit, not a number
        (f"/api/v1/runs/{RUN}/adapters/{'1' * 5000}/zip", 422),
        (f"/api/v1/runs/{RUN}/modules?round=9", 404),
        ("/api/v1/nothing-here", 404),
    ],
)
def test_errors_are_json_with_the_right_status(client: TestClient, path: str, status: int) -> None:
    response = client.get(path)
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"]


def test_admin_actions_refused_without_an_admin_token_setting(client: TestClient) -> None:
    response = client.post(f"/api/v1/runs/{RUN}/pause", headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 403 and "admin_token" in response.json()["detail"]


def test_admin_actions_reach_the_control(recorded: RecordedRun) -> None:
    control = FakeControl()
    for client in make_client(recorded, control=control, admin_token=ADMIN):
        url = f"/api/v1/runs/{RUN}"
        assert client.post(f"{url}/pause").status_code == 401
        wrong = client.post(f"{url}/pause", headers={"Authorization": "Bearer not-the-token-at-all"})
        assert wrong.status_code == 403
        auth = {"Authorization": f"Bearer {ADMIN}"}
        assert client.post(f"{url}/pause", headers=auth).json()["action"] == "pause"
        overview = client.get(url).json()
        assert overview["paused"] and overview["live"]
        assert client.post(f"{url}/resume", headers=auth).status_code == 200
        assert client.post(f"{url}/close-round", headers=auth).status_code == 200
        assert client.post(f"{url}/clients/bob/revoke", headers=auth).status_code == 200
        assert client.post(f"{url}/clients/zed/revoke", headers=auth).status_code == 404
        control.activity = Activity.AGGREGATING
        assert client.get(url).json()["activity"] == "aggregating"
        conflict = client.post(f"{url}/close-round", headers=auth)
        assert conflict.status_code == 409 and conflict.json()["detail"] == "no round is open"
    assert control.calls == ["pause", "resume", "close_round", "revoke bob"]


def test_admin_action_on_a_run_this_server_does_not_run(recorded: RecordedRun) -> None:
    for client in make_client(recorded, control=FakeControl(run_id="run-other"), admin_token=ADMIN):
        response = client.post(f"/api/v1/runs/{RUN}/pause", headers={"Authorization": f"Bearer {ADMIN}"})
        assert response.status_code == 409 and RUN in response.json()["detail"]


def test_read_token_protects_reading(recorded: RecordedRun) -> None:
    for client in make_client(recorded, read_token=READ, admin_token=ADMIN):
        assert client.get("/api/v1/runs").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/api/v1/runs", headers={"Authorization": "Bearer wrong-token"}).status_code == 403
        assert client.get("/api/v1/runs", headers={"Authorization": f"Bearer {READ}"}).status_code == 200
        assert client.get("/api/v1/runs", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        in_url = client.get(f"/api/v1/runs/{RUN}/adapters/latest/zip?token={READ}")
        assert in_url.status_code == 401 and "URL" in in_url.json()["detail"]
        assert client.get("/healthz").json() == {"status": "ok", "runs": 1}
        assert client.get("/").status_code == 200


def test_openapi_schema_lists_the_versioned_api(client: TestClient) -> None:
    schema = client.get("/api/v1/openapi.json").json()
    paths = schema["paths"]
    assert "/api/v1/runs/{run_id}/clients" in paths and "/api/v1/runs/{run_id}/pause" in paths
    assert "/healthz" in paths and "/metrics" in paths
    assert "Overview" in schema["components"]["schemas"]


def test_prometheus_metrics(client: TestClient) -> None:
    text = client.get("/metrics").text
    assert f'fedrot_rounds_completed{{run="{RUN}"}} 1.0' in text
    assert f'fedrot_current_round{{run="{RUN}"}} 1.0' in text
    assert f'fedrot_clients{{run="{RUN}",status="revoked"}} 1.0' in text
    assert f'fedrot_transfer_bytes_total{{direction="up",run="{RUN}"}} 5100.0' in text
    assert f'fedrot_transfer_bytes_total{{direction="down",run="{RUN}"}} 3750.0' in text
    assert f'fedrot_refused_uploads_total{{reason="INVALID_ARGUMENT",run="{RUN}"}} 2.0' in text
    assert f'fedrot_aggregation_error{{run="{RUN}"}} 0.02' in text
    assert f'fedrot_eval_accuracy{{run="{RUN}"}} 0.625' in text
    assert "fedrot_eval_exact_match" not in text and "fedrot_eval_perplexity" not in text
    assert f'fedrot_round_duration_seconds_count{{run="{RUN}"}} 1.0' in text
    assert f'fedrot_round_duration_seconds_bucket{{le="15.0",run="{RUN}"}} 0.0' in text
    assert f'fedrot_round_duration_seconds_bucket{{le="60.0",run="{RUN}"}} 1.0' in text


def test_prometheus_metrics_of_an_instruction_run(tmp_path: Path) -> None:
    """The latest closed round's held-out exact match, perplexity and loss; no accuracy."""
    for client in make_client(record_instruction_run(tmp_path / "state")):
        text = client.get("/metrics").text
    assert f'fedrot_eval_exact_match{{run="{INSTRUCT_RUN}"}} 0.5' in text
    assert f'fedrot_eval_perplexity{{run="{INSTRUCT_RUN}"}} 6.25' in text
    assert f'fedrot_eval_loss{{run="{INSTRUCT_RUN}"}} {math.log(6.25)!r}' in text
    assert "fedrot_eval_accuracy" not in text
    assert "# HELP fedrot_eval_exact_match Held-out exact match (fraction in [0, 1]" in text
    assert "# TYPE fedrot_eval_perplexity gauge" in text


def test_page_and_offline_chart_library_are_served(client: TestClient) -> None:
    page = client.get("/").text
    assert '<script src="/static/plotly.min.js">' in page and "http" not in page.split("<body>")[0]
    bundle = client.get("/static/plotly.min.js")
    assert bundle.status_code == 200 and b"plotly.js" in bundle.content[:200]
    assert client.get("/static/app.js").status_code == 200


def test_zip_downloads_leave_no_file_per_request(
    recorded: RecordedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One zip per adapter, kept and reused; a refused Range header leaves nothing behind."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    for client in make_client(recorded):
        url = f"/api/v1/runs/{RUN}/adapters/latest/zip"
        first = client.get(url).content
        for bad in ("bytes=999999999-", "bytes=abc", "bytes=5-1"):
            assert client.get(url, headers={"Range": bad}).status_code in (400, 416)
        assert client.get(url).content == first
        assert client.get(url, headers={"Range": "bytes=0-9"}).content == first[:10]
    (cache,) = temporary.iterdir()
    assert [p.suffix for p in cache.iterdir()] == [".zip"]


def test_an_unreadable_database_answers_503_in_json(tmp_path: Path) -> None:
    database = tmp_path / "fedrot.sqlite3"
    database.write_bytes(b"this is not a database" * 100)
    reader = open_reader(database)
    try:
        with TestClient(create_app(reader, runs_root=tmp_path / "runs")) as client:
            for path in ("/api/v1/runs", "/api/v1/runs/current", "/healthz"):
                response = client.get(path)
                assert response.status_code == 503, path
                assert response.json()["error"] == "state unavailable"
    finally:
        reader.close()


@pytest.mark.parametrize("argv", [["--listen", "8080"], ["--listen", "localhost"],
                                  ["--listen", "127.0.0.1:x"], ["--read-token", "short"]])  # fmt: skip
def test_standalone_dashboard_refuses_bad_options(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        standalone.parse_args(["--state-dir", "state", *argv])
    assert exit_.value.code == 2


def test_the_dashboard_never_imports_torch() -> None:
    code = ("import sys, fedrot_server.dashboard, fedrot_server.dashboard.serving, "
            "fedrot_server.dashboard.__main__; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('clean')")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


def test_standalone_dashboard_over_a_state_folder(recorded: RecordedRun) -> None:
    """``python -m fedrot_server.dashboard``: read-only, on port 0."""
    command = [sys.executable, "-m", "fedrot_server.dashboard", "--state-dir",
               str(recorded.state_dir), "--listen", "127.0.0.1:0"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        found = re.search(r"dashboard on port (\d+)", line)
        assert found, line
        url = f"http://127.0.0.1:{found.group(1)}/api/v1/runs/current"
        overview = httpx.get(url, timeout=30.0).json()
        assert overview["run"]["run_id"] == RUN and overview["live"] is False
        refused = httpx.post(url + "/pause", timeout=30.0)
        assert refused.status_code == 403  # no admin token, no control
    finally:
        process.terminate()
        process.wait(30)
        process.stderr.close()


def test_the_zip_cache_keeps_the_latest_few(tmp_path: Path) -> None:
    cache = ZipCache(keep=2)
    made = []
    for i in range(3):
        folder = tmp_path / f"adapter{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        made.append(cache.zip_of(AdapterFiles(folder, folder / "w", f"{i:064x}", 1), f"round-{i}"))
    assert [p.exists() for p in made] == [False, True, True]
    assert cache.zip_of(AdapterFiles(tmp_path / "adapter0", tmp_path / "w", f"{0:064x}", 1),
                        "round-0").exists()  # made again when asked for again
