"""``python -m fedrot_server.dashboard --state-dir DIR``: the dashboard alone, read-only, over a
server's state folder (a finished run, or a running server's from another process). No admin
actions (there is no run control here); reading is open unless a read token is given."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedrot_server.dashboard.app import create_app
from fedrot_server.dashboard.serving import start_dashboard
from fedrot_server.errors import StoreError
from fedrot_server.checks import check_dashboard_token, parse_listen
from fedrot_server.storage.store import open_reader
from fedrot_server.storage.telemetry import open_telemetry_reader

DATABASE = "fedrot.sqlite3"  # fedrot_server.settings.ServerSettings.database_path's name
READ_TOKEN_ENV = "FEDROT_SERVER_DASHBOARD_READ_TOKEN"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fedrot_server.dashboard", description=__doc__)
    parser.add_argument("--state-dir", type=Path, required=True, help="the server's state_dir")
    parser.add_argument("--listen", type=listen_address, default="127.0.0.1:8080",
                        help="host:port (port 0: any free one)")
    parser.add_argument("--read-token", type=read_token, default=os.environ.get(READ_TOKEN_ENV),
                        help=f"token needed to read (default: ${READ_TOKEN_ENV})")
    return parser.parse_args(argv)


def listen_address(text: str) -> tuple[str, int]:
    """argparse type of ``--listen``: the server's own ``host:port`` rule (a host is needed)."""
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def read_token(text: str) -> str:
    """argparse type of ``--read-token``: the server's own rule for dashboard tokens."""
    try:
        return check_dashboard_token(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def serve(args: argparse.Namespace) -> None:
    host, port = args.listen
    database = args.state_dir / DATABASE
    reader, telemetry = open_reader(database), open_telemetry_reader(database)
    app = create_app(reader, telemetry=telemetry, runs_root=args.state_dir / "runs",
                     read_token=args.read_token)  # fmt: skip
    dashboard = await start_dashboard(app, host, port, resources=(reader, telemetry))
    try:
        await dashboard.task
    finally:
        await dashboard.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        asyncio.run(serve(args))
    except StoreError as exc:
        print(f"dashboard: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
