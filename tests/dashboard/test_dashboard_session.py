"""Reading with a read token: the header for API users, a signed HttpOnly session cookie for the
page (downloads included), and never a token in the URL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dashboard_state import RUN, T0, RecordedRun, record_run, sha256
from fedrot_server.dashboard import create_app
from fedrot_server.dashboard.security import SESSION_COOKIE, SESSION_TTL_S, SessionSigner
from fedrot_server.storage.store import open_reader
from fedrot_server.storage.telemetry import open_telemetry_reader

READ = "read-token-0123456789"
ADMIN = "admin-token-0123456789"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def recorded(tmp_path: Path) -> RecordedRun:
    return record_run(tmp_path / "state")


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + 80.0)


@pytest.fixture
def client(recorded: RecordedRun, clock: Clock) -> Iterator[TestClient]:
    reader, telemetry = open_reader(recorded.db), open_telemetry_reader(recorded.db)
    app = create_app(reader, telemetry=telemetry, runs_root=recorded.runs_root, clock=clock,
                     read_token=READ, admin_token=ADMIN)  # fmt: skip
    try:
        with TestClient(app) as test_client:
            yield test_client
    finally:
        reader.close()
        telemetry.close()


def sign_in(client: TestClient, token: str = READ) -> None:
    response = client.post("/api/v1/session", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text


def test_the_page_learns_what_it_may_do_before_signing_in(client: TestClient) -> None:
    before = client.get("/api/v1/session").json()
    assert before == {"read_token_required": True, "can_read": False, "admin_enabled": True}
    assert client.get("/api/v1/runs").status_code == 401
    sign_in(client)
    assert client.get("/api/v1/session").json()["can_read"] is True


def test_the_cookie_is_http_only_strict_and_reads_downloads(client: TestClient, recorded: RecordedRun) -> None:
    response = client.post("/api/v1/session", headers={"Authorization": f"Bearer {READ}"})
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and READ not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert f"Max-Age={int(SESSION_TTL_S)}" in cookie
    latest = client.get(f"/api/v1/runs/{RUN}/adapters/latest").json()
    assert "token" not in latest["safetensors_url"] and "token" not in latest["zip_url"]
    weights = client.get(latest["safetensors_url"])
    assert weights.status_code == 200 and sha256(weights.content) == latest["sha256"]
    assert client.get(latest["zip_url"]).content[:2] == b"PK"
    assert client.get("/metrics").status_code == 200


def test_a_wrong_token_gets_no_cookie(client: TestClient) -> None:
    response = client.post("/api/v1/session", headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert response.status_code == 403 and "set-cookie" not in response.headers
    assert client.post("/api/v1/session").status_code == 401
    assert client.get("/api/v1/runs").status_code == 401


def test_the_token_is_refused_in_the_query_string(client: TestClient) -> None:
    for path in (f"/api/v1/runs/{RUN}/adapters/latest/zip?token={READ}", f"/api/v1/runs?token={READ}",
                 f"/metrics?token={READ}"):  # fmt: skip
        response = client.get(path)
        assert response.status_code == 401, path
        assert "not accepted" in response.json()["detail"]
    assert client.post(f"/api/v1/session?token={READ}").status_code == 401
    sign_in(client)  # even signed in: a token in a URL is an error, not ignored
    assert client.get(f"/api/v1/runs?token={READ}").status_code == 401


def test_authorization_headers_keep_working(client: TestClient) -> None:
    for token in (READ, ADMIN):
        assert client.get("/api/v1/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/api/v1/runs", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/api/v1/runs", headers={"Authorization": "Basic abc"}).status_code == 401


def test_the_cookie_expires_and_a_forged_one_is_refused(client: TestClient, clock: Clock) -> None:
    sign_in(client)
    clock.now += SESSION_TTL_S - 1
    assert client.get("/api/v1/runs").status_code == 200
    clock.now += 2
    assert client.get("/api/v1/runs").status_code == 401
    client.cookies.set(SESSION_COOKIE, SessionSigner().issue(clock.now))  # another key
    assert client.get("/api/v1/runs").status_code == 401
    client.cookies.set(SESSION_COOKIE, f"{int(clock.now) + 999}.{'0' * 64}")
    assert client.get("/api/v1/runs").status_code == 401


def test_signing_out_drops_the_cookie(client: TestClient) -> None:
    sign_in(client)
    response = client.delete("/api/v1/session")
    assert response.json()["can_read"] is False and 'Max-Age=0' in response.headers["set-cookie"]
    assert client.get("/api/v1/runs").status_code == 401


def test_the_cookie_never_authorises_admin_actions(client: TestClient) -> None:
    sign_in(client, ADMIN)  # the admin token reads too; its cookie still only reads
    assert client.get("/api/v1/runs").status_code == 200
    assert client.post(f"/api/v1/runs/{RUN}/pause").status_code == 401


def test_open_reading_needs_no_session(recorded: RecordedRun) -> None:
    reader = open_reader(recorded.db)
    try:
        with TestClient(create_app(reader, runs_root=recorded.runs_root)) as client:
            assert client.get("/api/v1/session").json() == {
                "read_token_required": False, "can_read": True, "admin_enabled": False}
            assert client.get("/api/v1/runs").status_code == 200
    finally:
        reader.close()
