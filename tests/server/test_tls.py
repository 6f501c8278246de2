"""TLS and mutual TLS on the gRPC port, with certificates made in the test.

The server's settings ``tls_cert_file``/``tls_key_file`` (TLS) and ``tls_client_ca_file``
(mutual TLS), the client's :class:`fedrot_client.transport.TlsConfig`, and the images'
``fedrot-healthcheck`` speaking TLS.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from certificates import CertificateAuthority, KeyPair
from fedrot_client.errors import ServerUnavailableError
from fedrot_client.settings import ClientSettings
from fedrot_client.transport import RetryPolicy, TlsConfig, Transport
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_proto.v1 import federation_pb2_grpc as pb_grpc
from fedrot_server.errors import SettingsError
from fedrot_server.settings import ServerSettings, load_settings
from wire import make_settings, running_server, synthetic_adapter, token_of

HEALTHCHECK = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"
QUICK = RetryPolicy(initial_s=0.05, max_s=0.1, give_up_after_s=0.3)


def load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("fedrot_healthcheck_tls", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


healthcheck = load_healthcheck()


@pytest.fixture(scope="module")
def authorities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertificateAuthority]:
    folder = tmp_path_factory.mktemp("pki")
    return {name: CertificateAuthority(folder / name, name) for name in ("ours", "theirs")}


def tls_settings(
    tmp_path: Path, server: KeyPair, client_ca: Path | None = None, **more: Any
) -> ServerSettings:
    return make_settings(tmp_path, ["alice"], tls_cert_file=server.cert, tls_key_file=server.key,
                         tls_client_ca_file=client_ca, **more)  # fmt: skip


def tls_config(ca: CertificateAuthority, client: KeyPair | None = None, **more: Any) -> TlsConfig:
    cert = client.cert.read_bytes() if client else None
    key = client.key.read_bytes() if client else None
    return TlsConfig(ca.cert.read_bytes(), cert, key, **more)


def enroll(address: str, tls: TlsConfig | None) -> pb.EnrollResponse:
    """Enrol ``alice`` through the client's own transport (retries UNAVAILABLE briefly)."""
    transport = Transport(address, token_of("alice"), policy=QUICK, tls=tls)
    try:
        return transport.enroll({"host": "test"})
    finally:
        transport.close()


def status_of_enroll(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """One Enroll over a plain gRPC channel; the status it ends with."""
    channel = (grpc.insecure_channel(address) if credentials is None
               else grpc.secure_channel(address, credentials))  # fmt: skip
    with channel:
        stub = pb_grpc.FederationServiceStub(channel)
        metadata = (("authorization", f"Bearer {token_of('alice')}"),)
        try:
            stub.Enroll(pb.EnrollRequest(), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def with_server(settings: Any, check: Any) -> None:
    """Start a server on ``settings``, run ``check(address)`` in a thread, stop the server."""

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            await asyncio.to_thread(check, f"127.0.0.1:{server.port}")

    asyncio.run(scenario())


def test_tls_client_with_the_right_ca_works_and_plaintext_or_another_ca_fails(
    tmp_path: Path, authorities: dict[str, CertificateAuthority]
) -> None:
    ours, theirs = authorities["ours"], authorities["theirs"]

    def check(address: str) -> None:
        assert enroll(address, tls_config(ours)).client_id == "alice"
        assert status_of_enroll(address, None) is grpc.StatusCode.UNAVAILABLE
        other = grpc.ssl_channel_credentials(theirs.cert.read_bytes())
        assert status_of_enroll(address, other) is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ServerUnavailableError):
            enroll(address, tls_config(theirs))

    with_server(tls_settings(tmp_path, ours.server()), check)


def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(
    tmp_path: Path, authorities: dict[str, CertificateAuthority]
) -> None:
    ours, theirs = authorities["ours"], authorities["theirs"]
    good, foreign = ours.client("alice"), theirs.client("mallory")

    def check(address: str) -> None:
        assert enroll(address, tls_config(ours, good)).client_id == "alice"
        assert status_of_enroll(address, None) is grpc.StatusCode.UNAVAILABLE
        no_cert = grpc.ssl_channel_credentials(ours.cert.read_bytes())
        assert status_of_enroll(address, no_cert) is grpc.StatusCode.UNAVAILABLE
        other_ca = grpc.ssl_channel_credentials(ours.cert.read_bytes(), foreign.key.read_bytes(),
                                                foreign.cert.read_bytes())  # fmt: skip
        assert status_of_enroll(address, other_ca) is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ServerUnavailableError):
            enroll(address, tls_config(ours, foreign))

    with_server(tls_settings(tmp_path, ours.server(), client_ca=ours.cert), check)


def test_a_certificate_for_another_name_needs_the_server_name_override(
    tmp_path: Path, authorities: dict[str, CertificateAuthority]
) -> None:
    ours = authorities["ours"]
    server = ours.issue("fed-example", server_names=("fed.example.org",))

    def check(address: str) -> None:
        with pytest.raises(ServerUnavailableError):
            enroll(address, tls_config(ours))
        assert enroll(address, tls_config(ours, server_name="fed.example.org")).client_id == "alice"

    with_server(tls_settings(tmp_path, server), check)


def test_healthcheck_speaks_tls_and_mutual_tls(
    tmp_path: Path, authorities: dict[str, CertificateAuthority]
) -> None:
    ours = authorities["ours"]
    server, probe = ours.server(), ours.client("probe")
    settings = tls_settings(tmp_path, server, client_ca=ours.cert)

    def check(address: str) -> None:
        port = address.rpartition(":")[2]
        flags = [address, "--tls-ca", str(ours.cert), "--tls-cert", str(probe.cert),
                 "--tls-key", str(probe.key)]  # fmt: skip
        assert healthcheck.main(flags, {}) == healthcheck.EXIT_SERVING
        no_cert = [address, "--tls-ca", str(ours.cert)]
        assert healthcheck.main(no_cert, {}) == healthcheck.EXIT_UNHEALTHY
        assert healthcheck.main([address], {}) == healthcheck.EXIT_UNHEALTHY
        environ = {
            "FEDROT_SERVER_LISTEN": f"0.0.0.0:{port}",
            "FEDROT_SERVER_TLS_CERT_FILE": str(server.cert),
            "FEDROT_HEALTHCHECK_TLS_CA_FILE": str(ours.cert),
            "FEDROT_HEALTHCHECK_TLS_CERT_FILE": str(probe.cert),
            "FEDROT_HEALTHCHECK_TLS_KEY_FILE": str(probe.key),
            "FEDROT_HEALTHCHECK_TLS_SERVER_NAME": "localhost",
        }
        assert healthcheck.main(["--role", "server"], environ) == healthcheck.EXIT_SERVING
        client_env = {
            "FEDROT_CLIENT_SERVER": address,
            "FEDROT_CLIENT_TLS_CA_FILE": str(ours.cert),
            "FEDROT_CLIENT_TLS_CERT_FILE": str(probe.cert),
            "FEDROT_CLIENT_TLS_KEY_FILE": str(probe.key),
        }
        assert healthcheck.main(["--role", "client"], client_env) == healthcheck.EXIT_SERVING

    with_server(settings, check)


def test_tls_settings_are_checked(
    tmp_path: Path, authorities: dict[str, CertificateAuthority]
) -> None:
    ours = authorities["ours"]
    server = ours.server()
    tokens = ["--tokens", "alice=token-alice-0123456789"]
    with pytest.raises(SettingsError, match="tls_cert_file and tls_key_file"):
        load_settings([*tokens, "--tls-cert-file", str(server.cert)])
    with pytest.raises(SettingsError, match="tls_client_ca_file"):
        load_settings([*tokens, "--tls-client-ca-file", str(ours.cert)])
    not_pem = tmp_path / "key.txt"
    not_pem.write_text("not a key")
    settings = tls_settings(tmp_path, KeyPair(server.cert, not_pem))

    async def start() -> None:
        async with running_server(settings, synthetic_adapter()):
            pass

    with pytest.raises(SettingsError, match="tls_key_file .*not a PEM file"):
        asyncio.run(start())


def test_client_settings_turn_tls_on_from_their_files(
    tmp_path: Path, authorities: dict[str, CertificateAuthority]
) -> None:
    ours = authorities["ours"]
    client = ours.client("carol")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    base = {"data": data, "token": "t" * 16}
    assert ClientSettings(**base).tls_config() is None
    assert ClientSettings(**base, tls=True).tls_config() == TlsConfig(None, None, None, None)
    settings = ClientSettings(**base, tls_ca_file=ours.cert, tls_cert_file=client.cert,
                              tls_key_file=client.key, tls_server_name="fed.example.org")
    pem = [path.read_bytes() for path in (ours.cert, client.cert, client.key)]
    assert settings.tls_config() == TlsConfig(*pem, "fed.example.org")
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file"):
        ClientSettings(**base, tls_cert_file=client.cert)


SYSTEM_ROOTS_CLIENT = """
import sys
from fedrot_client.settings import ClientSettings
from fedrot_client.transport import RetryPolicy, Transport
from fedrot_client.errors import ServerUnavailableError
address, token, data = sys.argv[1:]
settings = ClientSettings(server=address, token=token, data=data, tls=True)
transport = Transport(address, token, tls=settings.tls_config(),
                      policy=RetryPolicy(initial_s=0.05, max_s=0.1, give_up_after_s=0.3))
try:
    print(transport.enroll({"host": "test"}).client_id)
except ServerUnavailableError:
    print("unavailable")
finally:
    transport.close()
"""


def test_client_tls_flag_trusts_the_system_roots(
    tmp_path: Path, authorities: dict[str, CertificateAuthority]
) -> None:
    """``--tls`` alone: TLS with the roots gRPC trusts by default, which a process can point at a
    file with GRPC_DEFAULT_SSL_ROOTS_FILE_PATH (a fresh process each: gRPC reads them once)."""
    ours, theirs = authorities["ours"], authorities["theirs"]
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')

    def enroll_trusting(address: str, roots: Path) -> str:
        env = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(roots)}
        argv = [sys.executable, "-c", SYSTEM_ROOTS_CLIENT, address, token_of("alice"), str(data)]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    def check(address: str) -> None:
        assert enroll_trusting(address, ours.cert) == "alice"
        assert enroll_trusting(address, theirs.cert) == "unavailable"

    with_server(tls_settings(tmp_path, ours.server()), check)
