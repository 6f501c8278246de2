"""A federation over mutual TLS with real client processes, every log at DEBUG: it completes,
and neither the server's log nor the clients' logs hold a token or tensor content."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from harness import client_shards, tiny_settings, token_of

CLIENTS = ("alice", "bob")
# A refused call from a stranger, so the refusal path is logged too.
STRANGER_TOKEN = "stranger-token-0123456789abcdef"
# Tensor content in text: a torch repr, a run of 8 or more numbers, or a long binary-looking blob
# (longer than a 64-digit SHA-256, which the logs may show).
TENSOR_TEXT = re.compile(
    r"tensor\(|(?:-?\d+\.\d+(?:e[-+]?\d+)?,\s*){7}-?\d+\.\d+|[0-9a-f]{65,}|[A-Za-z0-9+/=]{100,}"
)


def load_certificates() -> ModuleType:
    """``tests/server/certificates.py`` (the test CA), loaded by path from this folder."""
    path = Path(__file__).resolve().parents[1] / "server" / "certificates.py"
    spec = importlib.util.spec_from_file_location("fedrot_test_certificates", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_mutual_tls_federation_logs_no_token_and_no_tensor(
    start_server, clients, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    authority = load_certificates().CertificateAuthority(tmp_path / "pki")
    server_pair = authority.server()
    settings = tiny_settings(tmp_path / "server", min_clients=2, rounds=1, log_level="DEBUG",
                             tls_cert_file=server_pair.cert, tls_key_file=server_pair.key,
                             tls_client_ca_file=authority.cert)  # fmt: skip
    caplog.set_level(logging.DEBUG)
    server = start_server(settings, evaluate=False)
    shards = client_shards(tmp_path / "data", sizes=(16, 16))
    for name, shard in zip(CLIENTS, shards, strict=True):
        pair = authority.client(name)
        clients.start(name, server.address, shard, extra=[
            "--log-level", "DEBUG", "--tls-ca-file", str(authority.cert),
            "--tls-cert-file", str(pair.cert), "--tls-key-file", str(pair.key)])  # fmt: skip
    stranger = authority.client("stranger")
    clients.start("stranger", server.address, shards[0],
                  extra=["--log-level", "DEBUG", "--tls-ca-file", str(authority.cert),
                         "--tls-cert-file", str(stranger.cert), "--tls-key-file", str(stranger.key)],
                  env={"FEDROT_CLIENT_TOKEN": STRANGER_TOKEN})  # fmt: skip
    codes = {client.name: client.wait() for client in clients.started}
    server.wait_finished()
    logs = {client.name: client.log() for client in clients.started}
    assert codes == {"alice": 0, "bob": 0, "stranger": 1}, logs
    assert sorted(server.report(0)["summary"]["reporters"]) == list(CLIENTS)
    assert "UNAUTHENTICATED" in logs["stranger"]

    logs["server"] = caplog.text + "\n".join(str(r.args) for r in caplog.records)
    assert "round 0 closed" in logs["server"]
    secrets = [token_of(name) for name in (*CLIENTS, "carol", "dave")] + [STRANGER_TOKEN]
    for who, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"a token in the {who} log"
        found = TENSOR_TEXT.search(text)
        assert found is None, f"tensor content in the {who} log: {found and found.group()[:200]}"
