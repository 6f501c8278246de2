"""TLS for the gRPC port: server credentials from PEM files, mutual TLS when a client CA is set.

``tls_cert_file`` + ``tls_key_file`` turn TLS on; ``tls_client_ca_file`` additionally requires
every client to present a certificate signed by that CA (mutual TLS; the bearer token is still
checked on every call). Without them the port is plaintext, for loopback or a private network.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from fedrot_server.errors import SettingsError
from fedrot_server.settings import ServerSettings


def read_pem(setting: str, path: Path) -> bytes:
    """The bytes of a PEM file, or SettingsError naming ``setting`` and the path."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"{setting} = {str(path)!r}: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise SettingsError(f"{setting} = {str(path)!r}: not a PEM file")
    return data


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """The port's credentials, or None for plaintext (no ``tls_cert_file``)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    pair = (
        read_pem("tls_key_file", settings.tls_key_file),
        read_pem("tls_cert_file", settings.tls_cert_file),
    )
    client_ca = settings.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=read_pem("tls_client_ca_file", client_ca) if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def add_port(
    server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Bind ``listen`` (with TLS when ``credentials``); returns the bound port."""
    try:
        if credentials is None:
            return server.add_insecure_port(listen)
        return server.add_secure_port(listen, credentials)
    except RuntimeError as exc:
        raise SettingsError(f"listen = {listen!r}: cannot bind ({exc})") from exc


def security_of(settings: ServerSettings) -> str:
    """``"mutual TLS"``, ``"TLS"`` or ``"plaintext"``: what the port speaks, for the logs."""
    if settings.tls_client_ca_file is not None:
        return "mutual TLS"
    return "TLS" if settings.tls_cert_file is not None else "plaintext"
