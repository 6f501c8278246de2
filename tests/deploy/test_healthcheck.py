"""deploy/healthcheck.py (the images' fedrot-healthcheck) against a real gRPC health service and
an HTTP server answering like the dashboard's ``/healthz``."""

from __future__ import annotations

import http.server
import importlib.util
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"
SERVICE = "fedrot.v1.FederationService"


def load_script():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("fedrot_healthcheck", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


healthcheck = load_script()


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(None)


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serving_server_is_healthy(health_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    done = run_script(f"127.0.0.1:{port}")
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout


def test_not_serving_or_unknown_service_is_unhealthy(
    health_server: tuple[int, health.HealthServicer],
) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    done = run_script(f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert "NOT_SERVING" in done.stdout
    done = run_script(f"127.0.0.1:{port}", "--service", SERVICE)
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stderr


def test_server_role_finds_the_port_in_the_listen_setting(
    health_server: tuple[int, health.HealthServicer],
) -> None:
    port, servicer = health_server
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    done = run_script(
        "--role", "server", "--service", SERVICE, env={"FEDROT_SERVER_LISTEN": f"0.0.0.0:{port}"}
    )
    assert done.returncode == 0, done.stderr


def test_client_role_asks_the_clients_server(
    health_server: tuple[int, health.HealthServicer],
) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    done = run_script("--role", "client", env={"FEDROT_CLIENT_SERVER": f"localhost:{port}"})
    assert done.returncode == 0, done.stderr


def test_nobody_listening_is_unhealthy() -> None:
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        done = run_script(f"127.0.0.1:{bound.getsockname()[1]}", "--timeout", "2")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr or "DEADLINE_EXCEEDED" in done.stderr


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("0.0.0.0:50051", "127.0.0.1:50051"),
        ("[::]:7", "127.0.0.1:7"),
        ("localhost:8", "127.0.0.1:8"),
        ("10.1.2.3:9", "10.1.2.3:9"),
        ("", "127.0.0.1:50051"),
    ],
)
def test_server_address_from_the_listen_setting(listen: str, address: str) -> None:
    assert healthcheck.server_address({"FEDROT_SERVER_LISTEN": listen}) == address


def test_a_bad_listen_setting_is_a_usage_error() -> None:
    assert healthcheck.main([], {"FEDROT_SERVER_LISTEN": "no-port"}) == healthcheck.EXIT_USAGE


def test_client_role_uses_tls_when_a_ca_file_is_set(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    address, tls = healthcheck.target_of(
        "client",
        None,
        {"FEDROT_CLIENT_SERVER": "fed.example.org:443", "FEDROT_CLIENT_TLS_CA_FILE": str(ca)},
    )
    assert (address, tls) == ("fed.example.org:443", healthcheck.TlsFiles(ca=ca))
    assert healthcheck.target_of("client", "x:1", {}) == ("x:1", None)
    system_roots = healthcheck.TlsFiles()
    for word, tls in (("true", system_roots), ("1", system_roots), ("false", None)):
        assert healthcheck.target_of("client", "x:1", {"FEDROT_CLIENT_TLS": word}) == ("x:1", tls)


class HealthzHandler(http.server.BaseHTTPRequestHandler):
    """``GET /healthz``: the dashboard's answer, or the status the test sets on the server."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status = getattr(self.server, "status", 200)
        body = json.dumps({"status": "ok", "runs": 0}).encode() if status == 200 else b"{}"
        self.send_response(status if self.path == "/healthz" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dashboard() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HealthzHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_dashboard_role_asks_healthz(dashboard: http.server.ThreadingHTTPServer) -> None:
    port = dashboard.server_address[1]
    env = {"FEDROT_SERVER_DASHBOARD_LISTEN": f"0.0.0.0:{port}"}
    done = run_script("--role", "dashboard", env=env)
    assert done.returncode == 0, done.stderr
    assert "dashboard: ok" in done.stdout
    dashboard.status = 503  # type: ignore[attr-defined]
    done = run_script("--role", "dashboard", f"127.0.0.1:{port}")
    assert done.returncode == 1 and "503" in done.stderr
    assert run_script("--role", "dashboard").returncode == healthcheck.EXIT_USAGE


def test_server_role_needs_both_grpc_and_the_dashboard(
    health_server: tuple[int, health.HealthServicer], dashboard: http.server.ThreadingHTTPServer
) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    env = {
        "FEDROT_SERVER_LISTEN": f"0.0.0.0:{port}",
        "FEDROT_SERVER_DASHBOARD_LISTEN": f"0.0.0.0:{dashboard.server_address[1]}",
    }
    done = run_script("--role", "server", env=env)
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout and "dashboard: ok" in done.stdout
    dashboard.status = 500  # type: ignore[attr-defined]
    done = run_script("--role", "server", env=env)
    assert done.returncode == 1 and "dashboard" in done.stderr
    with socket.socket() as bound:  # the dashboard port refuses connections
        bound.bind(("127.0.0.1", 0))
        closed = {**env, "FEDROT_SERVER_DASHBOARD_LISTEN": f"127.0.0.1:{bound.getsockname()[1]}"}
        done = run_script("--role", "server", env=closed)
    assert done.returncode == 1 and "dashboard" in done.stderr
    grpc_port_as_dashboard = {**env, "FEDROT_SERVER_DASHBOARD_LISTEN": f"127.0.0.1:{port}"}
    assert run_script("--role", "server", env=grpc_port_as_dashboard).returncode == 1
    no_dashboard = {**env, "FEDROT_SERVER_DASHBOARD_LISTEN": ""}  # switched off: gRPC alone
    assert run_script("--role", "server", env=no_dashboard).returncode == 0


@pytest.mark.parametrize(
    ("listen", "address"),
    [("0.0.0.0:8080", "127.0.0.1:8080"), ("10.1.2.3:9", "10.1.2.3:9"), ("", None)],
)
def test_dashboard_address_from_the_listen_setting(listen: str, address: str | None) -> None:
    assert healthcheck.dashboard_address({"FEDROT_SERVER_DASHBOARD_LISTEN": listen}) == address
    assert healthcheck.dashboard_address({}) is None
