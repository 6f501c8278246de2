#!/usr/bin/env python3
"""``fedrot-healthcheck``: ask a gRPC server's standard ``grpc.health.v1`` service if it serves.

The images install this file as ``/usr/local/bin/fedrot-healthcheck``; their ``HEALTHCHECK``,
the compose file and the Kubernetes probes run it. Exit status 0 when the service answers
SERVING, 1 otherwise (not serving, unreachable, timed out), 2 for a bad argument.

Where it asks, first match wins:

- ``ADDRESS`` (``host:port``) on the command line;
- ``--role server``: the port of ``$FEDROT_SERVER_LISTEN`` on loopback (a wildcard or loopback
  listen host becomes ``127.0.0.1``), default ``127.0.0.1:50051``;
- ``--role client``: ``$FEDROT_CLIENT_SERVER``: a client container is healthy while the server
  it works for is reachable.

TLS, first match wins: the ``--tls-ca``, ``--tls-cert``, ``--tls-key`` and ``--tls-server-name``
flags (any of them turns TLS on); for ``--role client`` the client's own
``$FEDROT_CLIENT_TLS_CA_FILE``, ``..._CERT_FILE``, ``..._KEY_FILE`` and ``..._SERVER_NAME``, and
``$FEDROT_CLIENT_TLS`` (true: TLS with the system roots); for
``--role server`` ``$FEDROT_HEALTHCHECK_TLS_CA_FILE``, ``..._CERT_FILE``, ``..._KEY_FILE`` and
``..._SERVER_NAME`` (the name in the server's certificate, since the check dials loopback), and
TLS whenever ``$FEDROT_SERVER_TLS_CERT_FILE`` is set. A server that requires mutual TLS needs
a client certificate and key here too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_SERVER_ADDRESS = "127.0.0.1:50051"
LOCAL_LISTEN_HOSTS = frozenset({"0.0.0.0", "[::]", "::", "localhost", "127.0.0.1"})
EXIT_SERVING, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2


def server_address(environ: Mapping[str, str]) -> str:
    """The loopback address of the local server, from ``FEDROT_SERVER_LISTEN``."""
    listen = environ.get("FEDROT_SERVER_LISTEN", "")
    if not listen:
        return DEFAULT_SERVER_ADDRESS
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"FEDROT_SERVER_LISTEN must be host:port, got {listen!r}")
    return f"127.0.0.1:{port}" if host in LOCAL_LISTEN_HOSTS else listen


@dataclass(frozen=True)
class TlsFiles:
    """TLS to the server: a CA file (None: the system roots), a client certificate and key
    for mutual TLS, and the name the server's certificate must carry (None: the host)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def channel(self, address: str) -> grpc.Channel:
        """A secure channel to ``address``; OSError when a file cannot be read."""
        files = (self.ca, self.cert, self.key)
        ca, cert, key = (None if path is None else path.read_bytes() for path in files)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, certificate_chain=cert, private_key=key
        )
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(address, credentials, options=options)


TLS_SUFFIXES = ("TLS_CA_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_SERVER_NAME")
TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})


def tls_of(role: str, flags: Sequence[str | None], environ: Mapping[str, str]) -> TlsFiles | None:
    """TLS from the flags ``(ca, cert, key, server_name)``, else from ``role``'s environment."""
    values = list(flags)
    if not any(values):
        prefix = "FEDROT_CLIENT_" if role == "client" else "FEDROT_HEALTHCHECK_"
        values = [environ.get(prefix + suffix) or None for suffix in TLS_SUFFIXES]
        server_tls = role == "server" and environ.get("FEDROT_SERVER_TLS_CERT_FILE")
        client_tls = role == "client" and environ.get("FEDROT_CLIENT_TLS", "").lower() in TRUE_WORDS
        if not any(values) and not server_tls and not client_tls:
            return None
    if (values[1] is None) != (values[2] is None):
        raise ValueError("a TLS client certificate needs its key, and a key its certificate")
    ca, cert, key = (Path(v) if v else None for v in values[:3])
    return TlsFiles(ca, cert, key, values[3])


def target_of(
    role: str, address: str | None, environ: Mapping[str, str], tls_flags: Sequence[str | None] = ()
) -> tuple[str, TlsFiles | None]:
    """``(host:port, TLS or None)`` to ask, for ``role`` and an explicit ``address``."""
    tls = tls_of(role, tls_flags, environ)
    if role == "client":
        return address or environ.get("FEDROT_CLIENT_SERVER", DEFAULT_SERVER_ADDRESS), tls
    return address or server_address(environ), tls


def check_health(address: str, service: str, timeout_s: float, tls: TlsFiles | None) -> str:
    """The health status name of ``service`` at ``address`` (``"SERVING"``, ...).

    Raises ``grpc.RpcError`` when the server cannot be reached or does not answer in time
    (a TLS handshake that fails is UNAVAILABLE), OSError when a TLS file cannot be read.
    """
    channel = grpc.insecure_channel(address) if tls is None else tls.channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        reply = stub.Check(request, timeout=timeout_s, wait_for_ready=False)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedrot-healthcheck", description="gRPC health check of a fedrot-server."
    )
    parser.add_argument("address", nargs="?", help="host:port (default: from the environment)")
    parser.add_argument("--role", choices=("server", "client"), default="server")
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--tls-ca", help="PEM CA of the server's certificate (turns TLS on)")
    parser.add_argument("--tls-cert", help="PEM client certificate, for mutual TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", help="name in the server's certificate")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        flags = (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
        address, tls = target_of(
            args.role, args.address, os.environ if environ is None else environ, flags
        )
    except ValueError as exc:
        print(f"fedrot-healthcheck: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        status = check_health(address, args.service, args.timeout, tls)
    except grpc.RpcError as exc:
        print(f"fedrot-healthcheck: {address}: {exc.code().name}", file=sys.stderr)
        return EXIT_UNHEALTHY
    except OSError as exc:
        print(f"fedrot-healthcheck: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_UNHEALTHY
    print(f"{address} {args.service or '<server>'}: {status}")
    return EXIT_SERVING if status == "SERVING" else EXIT_UNHEALTHY


if __name__ == "__main__":
    raise SystemExit(main())
