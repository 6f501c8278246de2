"""deploy/tls_init.py (the images' fedrot-tls-init): a CA and a server certificate that a real
TLS gRPC server serves and fedrot-healthcheck trusts, by name and by IP; kept on a rerun,
issued again from the same CA when the names change."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCRIPT = DEPLOY / "tls_init.py"
HEALTHCHECK = DEPLOY / "healthcheck.py"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def run(tmp_path: Path, names: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), f"--authority-dir={tmp_path / 'authority'}",
         f"--server-dir={tmp_path / 'server'}", f"--ca-dir={tmp_path / 'clients'}",
         f"--names={names}", *extra],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def names_of(cert: Path) -> str:
    done = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[int]:
    """A gRPC health service (SERVING) on loopback with the certificate tls_init made."""
    done = run(tmp_path, "server,localhost,127.0.0.1,")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "server"
    credentials = grpc.ssl_server_credentials(
        [((folder / "server.key").read_bytes(), (folder / "server.pem").read_bytes())]
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args, "--timeout", "5"],
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def test_clients_with_the_ca_reach_the_server_by_name_and_by_ip(
    tls_server: int, tmp_path: Path
) -> None:
    ca = tmp_path / "clients" / "ca.pem"
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == ["ca.pem"]
    by_ip = healthcheck(f"127.0.0.1:{tls_server}", "--tls-ca", str(ca))
    assert by_ip.returncode == 0, by_ip.stderr
    for name in ("localhost", "server"):  # the health check's name and the compose clients'
        address = f"127.0.0.1:{tls_server}"
        done = healthcheck(address, "--tls-ca", str(ca), f"--tls-server-name={name}")
        assert done.returncode == 0, (name, done.stderr)


def test_a_name_not_in_the_certificate_or_another_ca_fails(tls_server: int, tmp_path: Path) -> None:
    ca = tmp_path / "clients" / "ca.pem"
    wrong_name = "--tls-server-name=evil.example.org"
    done = healthcheck(f"127.0.0.1:{tls_server}", "--tls-ca", str(ca), wrong_name)
    assert done.returncode == 1
    other = tmp_path / "other"
    assert run(other, "server").returncode == 0
    done = healthcheck(f"127.0.0.1:{tls_server}", "--tls-ca", str(other / "clients" / "ca.pem"))
    assert done.returncode == 1
    assert healthcheck(f"127.0.0.1:{tls_server}").returncode == 1  # plaintext


def test_keys_are_private_and_the_ca_key_stays_in_the_authority(tmp_path: Path) -> None:
    assert run(tmp_path, "server").returncode == 0
    assert sorted(p.name for p in (tmp_path / "authority").iterdir()) == ["ca.key", "ca.pem"]
    server_files = sorted(p.name for p in (tmp_path / "server").iterdir())
    assert server_files == ["ca.pem", "server.key", "server.pem"]
    for key in (tmp_path / "authority" / "ca.key", tmp_path / "server" / "server.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o400
    assert stat.S_IMODE((tmp_path / "server" / "server.pem").stat().st_mode) == 0o444


def test_a_rerun_keeps_everything_and_new_names_keep_the_ca(tmp_path: Path) -> None:
    assert run(tmp_path, "server,localhost").returncode == 0
    ca, cert = tmp_path / "authority" / "ca.pem", tmp_path / "server" / "server.pem"
    first_ca, first_cert = ca.read_bytes(), cert.read_bytes()
    done = run(tmp_path, "localhost,server")
    assert done.returncode == 0 and "kept" in done.stdout
    assert (ca.read_bytes(), cert.read_bytes()) == (first_ca, first_cert)
    done = run(tmp_path, "server,localhost,fed.example.org,10.0.0.7")
    assert done.returncode == 0 and "issued" in done.stdout
    assert ca.read_bytes() == first_ca and cert.read_bytes() != first_cert
    assert "DNS:fed.example.org" in names_of(cert) and "IP Address:10.0.0.7" in names_of(cert)
    assert (tmp_path / "clients" / "ca.pem").read_bytes() == first_ca


def test_a_certificate_of_another_ca_is_issued_again(tmp_path: Path) -> None:
    assert run(tmp_path, "server").returncode == 0
    for path in (tmp_path / "authority").iterdir():
        path.unlink()
    done = run(tmp_path, "server")
    assert done.returncode == 0 and "new CA" in done.stdout and "issued" in done.stdout
    ca, cert = tmp_path / "clients" / "ca.pem", tmp_path / "server" / "server.pem"
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)], check=False)
    assert verified.returncode == 0


@pytest.mark.parametrize(
    ("names", "message"), [(",,", "no name"), ("bad name!", "neither a DNS name")]
)
def test_bad_names_are_refused(tmp_path: Path, names: str, message: str) -> None:
    done = run(tmp_path, names)
    assert done.returncode == 2 and message in done.stderr
