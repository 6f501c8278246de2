"""The admin API of a standing server's runs (``POST /api/v1/runs``, ``POST
/api/v1/runs/{id}/stop``, ``GET /api/v1/runs``) and the ``fedrot run`` command over it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from fedrot.cli import main as fedrot_main
from live_federation import ADMIN, LiveServer, live_settings, wait_for

RUN = {"rounds": 2, "min_clients": 3, "lora": {"rank": 2, "alpha": 4.0,
                                               "target_modules": ["query", "value"]}}  # fmt: skip
BEARER = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def standing(tmp_path: Path):  # noqa: ANN201
    server = LiveServer(live_settings(tmp_path, standing=True), evaluate=False)
    yield server
    server.stop()


def post(server: LiveServer, path: str, **kwargs) -> httpx.Response:  # noqa: ANN003
    return httpx.post(server.url + "/api/v1" + path, timeout=30.0, **kwargs)


def runs_of(server: LiveServer) -> dict[str, dict]:
    listed = httpx.get(server.url + "/api/v1/runs", timeout=30.0).json()
    return {run["run_id"]: run for run in listed}


def test_submit_list_and_stop(standing: LiveServer) -> None:
    answers = [post(standing, "/runs", json={**RUN, "seed": seed}, headers=BEARER)
               for seed in range(3)]  # fmt: skip
    assert [a.status_code for a in answers] == [201, 201, 201]
    first, second, third = (a.json()["run_id"] for a in answers)
    wait_for(lambda: runs_of(standing)[first]["phase"] == "waiting", "the first run to start")
    runs = runs_of(standing)
    assert list(runs) == [first, second, third]  # submission order
    assert [(runs[r]["phase"], runs[r]["queue_position"]) for r in (second, third)] == [
        ("queued", 1), ("queued", 2)]  # fmt: skip
    assert runs[second]["rounds_total"] == 2

    stopped = post(standing, f"/runs/{second}/stop", headers=BEARER)
    assert stopped.status_code == 200 and "cancelled" in stopped.json()["detail"]
    assert runs_of(standing)[third]["queue_position"] == 1
    stopped = post(standing, f"/runs/{first}/stop", headers=BEARER)
    assert stopped.status_code == 200 and "stopped" in stopped.json()["detail"]
    wait_for(lambda: runs_of(standing)[third]["phase"] == "waiting", "the third run to start")
    runs = runs_of(standing)
    assert (runs[first]["phase"], runs[second]["phase"]) == ("stopped", "stopped")
    again = post(standing, f"/runs/{first}/stop", headers=BEARER)
    assert again.status_code == 409
    assert post(standing, "/runs/run-nonesuch/stop", headers=BEARER).status_code == 404


def test_submissions_need_the_admin_token(standing: LiveServer) -> None:
    assert post(standing, "/runs", json=RUN).status_code == 401
    wrong = post(standing, "/runs", json=RUN, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 403
    assert post(standing, "/runs/current/stop").status_code == 401
    assert runs_of(standing) == {}


def test_a_bad_run_is_422_naming_the_setting(standing: LiveServer) -> None:
    answer = post(standing, "/runs", json={**RUN, "lora": {"rank": 0}, "rounds": "many",
                                           "listen": "0.0.0.0:1"}, headers=BEARER)  # fmt: skip
    assert answer.status_code == 422
    body = answer.json()
    assert body["error"] == "invalid run settings"
    assert {p["where"] for p in body["detail"]} == {"lora.rank", "rounds", "listen"}
    unknown = post(standing, "/runs", json={**RUN, "clients": ["mallory"], "min_clients": 1},
                   headers=BEARER)  # fmt: skip
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["where"] == "clients"
    not_an_object = post(standing, "/runs", json=[1, 2], headers=BEARER)
    assert not_an_object.status_code == 422
    assert runs_of(standing) == {}


def test_a_single_run_server_refuses_submissions(tmp_path: Path) -> None:
    server = LiveServer(live_settings(tmp_path), evaluate=False)
    try:
        answer = post(server, "/runs", json=RUN, headers=BEARER)
        assert answer.status_code == 409 and "--standing" in answer.json()["detail"]
    finally:
        server.stop()


def test_the_fedrot_run_command(standing: LiveServer, tmp_path: Path, capsys,  # noqa: ANN001
                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    run_file = tmp_path / "run.toml"
    run_file.write_text('rounds = 1\nmin_clients = 3\nclients = ["alice", "bob", "carol"]\n'
                        '[lora]\nrank = 2\nalpha = 4.0\ntarget_modules = ["query", "value"]\n')
    monkeypatch.setenv("FEDROT_ADMIN_TOKEN", ADMIN)
    url = ["--url", standing.url]
    assert fedrot_main(["run", "submit", str(run_file), *url]) == 0
    run_id = capsys.readouterr().out.strip()
    assert run_id in runs_of(standing)
    assert fedrot_main(["run", "list", *url]) == 0
    assert f"{run_id}  " in capsys.readouterr().out
    assert fedrot_main(["run", "stop", run_id, *url]) == 0
    assert "stopped" in capsys.readouterr().out

    run_file.write_text("rounds = 0\n")
    assert fedrot_main(["run", "submit", str(run_file), *url]) == 1
    assert capsys.readouterr().err.strip() == (
        "fedrot run submit: 422 invalid run settings: rounds: Input should be greater than or "
        "equal to 1")
    monkeypatch.delenv("FEDROT_ADMIN_TOKEN")
    assert fedrot_main(["run", "stop", run_id, *url]) == 1
    assert "401 unauthenticated" in capsys.readouterr().err
    assert fedrot_main(["run", "list", "--url", "http://127.0.0.1:9", "--admin-token", ADMIN]) == 1
    assert "connection refused" in capsys.readouterr().err
