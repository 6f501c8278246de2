"""The runs table, how far a run is (round N of M, its stage, the time left), any round's
per-module view, the new diagnostics when reported, and the small things a browser asks for:
a favicon, HEAD on downloads, the API reference page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dashboard_state import (
    INSTRUCT_RUN,
    RUN,
    SHOWCASE_ACCURACY,
    SHOWCASE_CLOSED,
    SHOWCASE_ROUNDS,
    SHOWCASE_RUN,
    T0,
    FakeControl,
    RecordedRun,
    record_instruction_run,
    record_run,
    record_showcase_run,
    serve_recorded,
    sha256,
)
from fedrot_server.runs.control import Activity
from fedrot_server.storage.store import SqliteStore

NOW = T0 + 5000.0


def serve(run: RecordedRun, now: float, **kwargs: object) -> Iterator[TestClient]:
    return serve_recorded(run, now, **kwargs)


@pytest.fixture
def showcase(tmp_path: Path) -> RecordedRun:
    return record_showcase_run(tmp_path / "state", NOW)


@pytest.fixture
def client(showcase: RecordedRun) -> Iterator[TestClient]:
    yield from serve(showcase, NOW)


def test_every_run_is_listed_with_strategy_lambda_and_best_metric(client: TestClient) -> None:
    finished, running = client.get("/api/v1/runs").json()
    assert (finished["run_id"], finished["phase"], finished["finished_at"]) == (INSTRUCT_RUN, "finished", T0 + 400)
    assert finished["best"] == {"name": "exact_match", "value": 0.5, "round": 2}
    assert (finished["strategy"], finished["alignment_strength"], finished["task"]) == ("fedrot", 0.4, "causal-lm")
    assert running["run_id"] == SHOWCASE_RUN and running["phase"] == "running"
    assert (running["rounds_completed"], running["rounds_total"]) == (SHOWCASE_CLOSED, SHOWCASE_ROUNDS)
    assert running["best"] == {"name": "accuracy", "value": max(SHOWCASE_ACCURACY), "round": 5}


def test_a_finished_run_stays_browsable_and_downloadable(client: TestClient) -> None:
    overview = client.get(f"/api/v1/runs/{INSTRUCT_RUN}").json()
    assert overview["stage"] == "finished" and overview["round_number"] == 3
    assert overview["deadline"] is None and overview["eta_s"] is None
    adapters = client.get(f"/api/v1/runs/{INSTRUCT_RUN}/adapters").json()
    assert [a["name"] for a in adapters] == ["initial", "round-0", "round-1", "round-2"]
    weights = client.get(adapters[-1]["safetensors_url"])
    assert weights.status_code == 200 and sha256(weights.content) == adapters[-1]["sha256"]


def test_rounds_count_from_one_with_the_stage_and_time_left(client: TestClient) -> None:
    body = client.get("/api/v1/runs/current").json()
    assert body["run"]["run_id"] == SHOWCASE_RUN
    assert (body["current_round"], body["round_number"]) == (SHOWCASE_CLOSED, SHOWCASE_CLOSED + 1)
    assert body["stage"] == "training" and body["seconds_left"] == pytest.approx(95.0)
    durations = [40.0 + 3 * t for t in range(SHOWCASE_CLOSED)]  # see record_showcase_run
    opened = NOW - 25.0
    expected = (SHOWCASE_ROUNDS - SHOWCASE_CLOSED) * sum(durations) / len(durations) - (NOW - opened)
    assert body["eta_s"] == pytest.approx(max(0.0, expected))


def test_while_aggregating_the_deadline_stops_counting(showcase: RecordedRun) -> None:
    control = FakeControl(run_id=SHOWCASE_RUN, activity=Activity.AGGREGATING)
    for client in serve(showcase, NOW, control=control):
        body = client.get("/api/v1/runs/current").json()
        assert body["stage"] == "aggregating" and body["activity"] == "aggregating"
        assert body["deadline"] is None and body["seconds_left"] is None
        assert body["round_number"] == SHOWCASE_CLOSED + 1


def test_a_closed_round_being_evaluated_reads_evaluating(tmp_path: Path) -> None:
    run = record_instruction_run(tmp_path / "state")
    store = SqliteStore(run.db)
    store.create_run("run-evaluating", {"rounds": 4, "strategy": {"name": "fedit"}}, T0)
    store.open_round("run-evaluating", 0, ["alice"], T0 + 1, T0 + 60)
    store.close_round("run-evaluating", 0, at=T0 + 30, reporters=["alice"], adapter_sha256=None,
                      summary={"evaluating": True, "evaluation": {}})  # fmt: skip
    store.close()
    for client in serve(run, T0 + 40):
        body = client.get("/api/v1/runs/run-evaluating").json()
        assert (body["stage"], body["round_number"], body["deadline"]) == ("evaluating", 1, None)
        assert body["eta_s"] == pytest.approx(3 * 29.0)
        (row,) = client.get("/api/v1/runs/run-evaluating/rounds").json()
        assert row["evaluating"] is True and row["rotation_drift_share"] is None


def test_before_the_first_round(tmp_path: Path) -> None:
    run = record_instruction_run(tmp_path / "state")
    store = SqliteStore(run.db)
    store.create_run("run-new", {"rounds": 6}, T0 + 1000)
    store.close()
    for client in serve(run, T0 + 1001):
        body = client.get("/api/v1/runs/run-new").json()
        assert (body["round_number"], body["stage"], body["eta_s"], body["run"]["best"]) == (None, "waiting", None, None)


def test_the_diagnostics_of_newer_servers_show_when_reported(client: TestClient) -> None:
    rounds = client.get(f"/api/v1/runs/{SHOWCASE_RUN}/rounds").json()
    first = rounds[0]
    assert first["rotation_drift_share"] == pytest.approx(0.55)
    assert first["fedit_aggregation_error"] == pytest.approx(2.2 * 0.08)
    assert first["fedit_relative_aggregation_error"] == pytest.approx(2.2 * 0.08 / 2.5)
    assert rounds[-1]["phase"] == "open" and rounds[-1]["rotation_drift_share"] is None
    older = client.get(f"/api/v1/runs/{INSTRUCT_RUN}/rounds").json()  # no such keys
    assert all(r["fedit_aggregation_error"] is None and r["rotation_drift_share"] is None for r in older)


def test_the_per_module_view_of_any_round(client: TestClient) -> None:
    url = f"/api/v1/runs/{SHOWCASE_RUN}/modules"
    latest = client.get(url).json()
    assert latest["round"] == SHOWCASE_CLOSED - 1
    errors = {}
    for t in range(SHOWCASE_CLOSED):
        body = client.get(f"{url}?round={t}").json()
        assert body["round"] == t and body["aligned"] == "A"
        errors[t] = [m["aggregation_error"] for m in body["modules"]]
        assert errors[t] == pytest.approx([0.01 / (1 + t), 0.02 / (1 + t)])
    assert client.get(f"{url}?round={SHOWCASE_CLOSED}").json() == {"round": SHOWCASE_CLOSED, "aligned": None,
                                                                   "modules": []}  # open: no report yet
    assert client.get(f"{url}?round=99").status_code == 404
    assert client.get(f"{url}?round=one").status_code == 422
    no_report = client.get(f"/api/v1/runs/{INSTRUCT_RUN}/modules?round=1").json()
    assert no_report == {"round": 1, "aligned": None, "modules": []}


def test_head_on_downloads(client: TestClient) -> None:
    latest = client.get(f"/api/v1/runs/{SHOWCASE_RUN}/adapters/latest").json()
    head = client.head(latest["safetensors_url"])
    assert head.status_code == 200 and head.content == b""
    assert head.headers["x-content-sha256"] == latest["sha256"]
    assert int(head.headers["content-length"]) == latest["size_bytes"]
    zipped = client.head(latest["zip_url"])
    assert zipped.status_code == 200 and zipped.headers["content-type"] == "application/zip"
    assert int(zipped.headers["content-length"]) == len(client.get(latest["zip_url"]).content)
    assert client.head(f"/api/v1/runs/{SHOWCASE_RUN}/adapters/77/zip").status_code == 404


def test_favicon_and_api_reference(client: TestClient) -> None:
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO header
    assert '<link rel="icon" href="/favicon.ico">' in client.get("/").text
    docs = client.get("/api/v1/docs")
    assert docs.status_code == 200 and "/static/apidocs.js" in docs.text
    assert "http" not in docs.text.split("<body>")[0]  # no CDN
    assert client.get("/static/apidocs.js").status_code == 200
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    assert "head" in paths["/api/v1/runs/{run_id}/adapters/{which}/zip"]
    assert "/api/v1/session" in paths


def test_the_recorded_run_still_reads_as_before(tmp_path: Path) -> None:
    """The classification run of the other tests: round 2 of 3, training."""
    for client in serve(record_run(tmp_path / "state"), T0 + 80.0):
        body = client.get(f"/api/v1/runs/{RUN}").json()
        assert (body["round_number"], body["stage"], body["seconds_left"]) == (2, "training", pytest.approx(30.0))
        assert body["eta_s"] == pytest.approx(2 * 30.0 - 30.0)
