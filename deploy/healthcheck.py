#!/usr/bin/env python3
"""``fedrot-healthcheck``: ask a fedrot-server if it serves: its standard ``grpc.health.v1``
service and, where it runs one, its dashboard's ``/healthz``.

The images install this file as ``/usr/local/bin/fedrot-healthcheck``; their ``HEALTHCHECK``,
the compose file and the Kubernetes probes run it. Exit status 0 when every check passes
(gRPC SERVING, dashboard ``{"status": "ok"}``), 1 otherwise (not serving, unreachable, timed
out), 2 for a bad argument.

Roles:

- ``--role server``: the gRPC health service at the port of ``$FEDROT_SERVER_LISTEN`` on
  loopback (a wildcard or loopback listen host becomes ``127.0.0.1``; default
  ``127.0.0.1:50051``), then, when ``$FEDROT_SERVER_DASHBOARD_LISTEN`` is set and not empty,
  the dashboard's ``/healthz`` at its port on loopback;
- ``--role dashboard``: the dashboard's ``/healthz`` only (``ADDRESS`` or
  ``$FEDROT_SERVER_DASHBOARD_LISTEN``);
- ``--role client``: ``$FEDROT_CLIENT_SERVER``: a client container is healthy while the server
  it works for is reachable.

An ``ADDRESS`` (``host:port``) on the command line replaces the gRPC address (the dashboard's
for ``--role dashboard``). ``/healthz`` needs no token, even with a dashboard read token set.

TLS, first match wins: the ``--tls-ca``, ``--tls-cert``, ``--tls-key`` and ``--tls-server-name``
flags (any of them turns TLS on); for ``--role client`` the client's own
``$FEDROT_CLIENT_TLS_CA_FILE``, ``..._CERT_FILE``, ``..._KEY_FILE`` and ``..._SERVER_NAME``, and
``$FEDROT_CLIENT_TLS`` (true: TLS with the system roots); for
``--role server`` ``$FEDROT_HEALTHCHECK_TLS_CA_FILE``, ``..._CERT_FILE``, ``..._KEY_FILE`` and
``..._SERVER_NAME`` (the name in the server's certificate, since the check dials loopback), and
TLS whenever ``$FEDROT_SERVER_TLS_CERT_FILE`` is set. A server that requires mutual TLS needs
a client certificate and key here too. The dashboard is plain HTTP.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_SERVER_ADDRESS = "127.0.0.1:50051"
LOCAL_LISTEN_HOSTS = frozenset({"0.0.0.0", "[::]", "::", "localhost", "127.0.0.1"})
EXIT_SERVING, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2


def loopback_address(variable: str, listen: str) -> str:
    """``listen`` (``host:port``, the value of ``variable``) as an address to dial from the
    same machine: a wildcard or loopback host becomes ``127.0.0.1``."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{variable} must be host:port, got {listen!r}")
    return f"127.0.0.1:{port}" if host in LOCAL_LISTEN_HOSTS else listen


def server_address(environ: Mapping[str, str]) -> str:
    """The loopback address of the local server, from ``FEDROT_SERVER_LISTEN``."""
    listen = environ.get("FEDROT_SERVER_LISTEN", "")
    return loopback_address("FEDROT_SERVER_LISTEN", listen) if listen else DEFAULT_SERVER_ADDRESS


def dashboard_address(environ: Mapping[str, str]) -> str | None:
    """The loopback address of the local dashboard, from ``FEDROT_SERVER_DASHBOARD_LISTEN``;
    None when it is unset or empty (no dashboard to check)."""
    listen = environ.get("FEDROT_SERVER_DASHBOARD_LISTEN", "")
    return loopback_address("FEDROT_SERVER_DASHBOARD_LISTEN", listen) if listen else None


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


def check_dashboard(address: str, timeout_s: float) -> str:
    """The ``status`` of the dashboard's ``GET /healthz`` at ``address`` (``"ok"``).

    Raises OSError when it cannot be reached, does not answer in time or answers an HTTP error
    (``urllib.error.URLError`` and ``HTTPError`` are OSErrors), ``http.client.HTTPException``
    when what answers does not speak HTTP/1.1, ValueError when the answer is not its JSON.
    Proxy variables are ignored: the check dials the address itself.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{address}/healthz", timeout=timeout_s) as reply:
        body = json.loads(reply.read())
    if not isinstance(body, dict) or "status" not in body:
        raise ValueError(f"http://{address}/healthz: not a health answer: {body!r}")
    return str(body["status"])


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedrot-healthcheck", description="Health check of a fedrot-server (gRPC, dashboard)."
    )
    parser.add_argument("address", nargs="?", help="host:port (default: from the environment)")
    parser.add_argument("--role", choices=("server", "client", "dashboard"), default="server")
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--tls-ca", help="PEM CA of the server's certificate (turns TLS on)")
    parser.add_argument("--tls-cert", help="PEM client certificate, for mutual TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", help="name in the server's certificate")
    return parser.parse_args(argv)


def grpc_ok(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """The gRPC health check of ``args.role`` (server or client): an exit status."""
    try:
        flags = (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
        address, tls = target_of(args.role, args.address, environ, flags)
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


def dashboard_ok(address: str | None, environ: Mapping[str, str], timeout_s: float) -> int:
    """The dashboard check at ``address`` (else from the environment): an exit status.
    Nothing to check (no address, no dashboard listen setting) passes."""
    try:
        address = address or dashboard_address(environ)
    except ValueError as exc:
        print(f"fedrot-healthcheck: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if address is None:
        return EXIT_SERVING
    try:
        status = check_dashboard(address, timeout_s)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        print(f"fedrot-healthcheck: dashboard {address}: {exc}", file=sys.stderr)
        return EXIT_UNHEALTHY
    print(f"{address} dashboard: {status}")
    return EXIT_SERVING if status == "ok" else EXIT_UNHEALTHY


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    if args.role == "dashboard":
        if not (args.address or environ.get("FEDROT_SERVER_DASHBOARD_LISTEN")):
            print("fedrot-healthcheck: --role dashboard needs ADDRESS or "
                  "FEDROT_SERVER_DASHBOARD_LISTEN", file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
        return dashboard_ok(args.address, environ, args.timeout)
    status = grpc_ok(args, environ)
    if status != EXIT_SERVING or args.role != "server":
        return status
    return dashboard_ok(None, environ, args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
