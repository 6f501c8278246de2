#!/usr/bin/env python3
"""``fedrot-healthcheck``: ask a gRPC server's standard ``grpc.health.v1`` service if it serves.

The images install this file as ``/usr/local/bin/fedrot-healthcheck``; their ``HEALTHCHECK``,
the compose file and the Kubernetes probes run it. Exit status 0 when the service answers
SERVING, 1 otherwise (not serving, unreachable, timed out), 2 for a bad argument.

Where it asks, first match wins:

- ``ADDRESS`` (``host:port``) on the command line;
- ``--role server``: the port of ``$FEDROT_SERVER_LISTEN`` on loopback (a wildcard or loopback
  listen host becomes ``127.0.0.1``), default ``127.0.0.1:50051``;
- ``--role client``: ``$FEDROT_CLIENT_SERVER`` over TLS when ``$FEDROT_CLIENT_TLS_CA_FILE``
  is set: a client container is healthy while the server it works for is reachable.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
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


def target_of(
    role: str, address: str | None, environ: Mapping[str, str]
) -> tuple[str, Path | None]:
    """``(host:port, CA file or None)`` to ask, for ``role`` and an explicit ``address``."""
    if role == "client":
        ca = environ.get("FEDROT_CLIENT_TLS_CA_FILE") or None
        return address or environ.get("FEDROT_CLIENT_SERVER", DEFAULT_SERVER_ADDRESS), (
            Path(ca) if ca else None
        )
    return address or server_address(environ), None


def check_health(address: str, service: str, timeout_s: float, ca_file: Path | None) -> str:
    """The health status name of ``service`` at ``address`` (``"SERVING"``, ...).

    Raises ``grpc.RpcError`` when the server cannot be reached or does not answer in time.
    """
    if ca_file is None:
        channel = grpc.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
        channel = grpc.secure_channel(address, credentials)
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        address, ca_file = target_of(
            args.role, args.address, os.environ if environ is None else environ
        )
    except ValueError as exc:
        print(f"fedrot-healthcheck: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        status = check_health(address, args.service, args.timeout, ca_file)
    except grpc.RpcError as exc:
        print(f"fedrot-healthcheck: {address}: {exc.code().name}", file=sys.stderr)
        return EXIT_UNHEALTHY
    except OSError as exc:
        print(f"fedrot-healthcheck: {ca_file}: {exc.strerror}", file=sys.stderr)
        return EXIT_UNHEALTHY
    print(f"{address} {args.service or '<server>'}: {status}")
    return EXIT_SERVING if status == "SERVING" else EXIT_UNHEALTHY


if __name__ == "__main__":
    raise SystemExit(main())
