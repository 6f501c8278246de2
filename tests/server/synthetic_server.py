"""``fedrot-server`` on the synthetic adapter of :mod:`wire`, as a process a test can SIGKILL.

``python synthetic_server.py CONFIG.json [--stop-at STEP]`` serves with the settings in the
file and prints ``serving <run_id> on port <port>`` on stdout once it serves; logs go to stderr.
With ``--stop-at``, the first upload's commit stops for good at one step between its last
chunk and its aggregation, and the server prints ``stopped at STEP`` (for the test to kill it
there): ``check`` (all bytes received and verified, before the upload is decoded and checked),
``publish`` (just after the upload's file moved into the spool, before it is recorded),
``record`` (just after the upload was recorded, before the acknowledgement), ``aggregate``
(after the acknowledgement, before the worker aggregates the upload).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
from typing import Any

from fedrot_server.storage.artifacts import RunArtifacts
from fedrot_server.main import serve
from fedrot_server.service import FederationServer
from fedrot_server.settings import load_settings
from fedrot_server.storage.store import SqliteStore
from fedrot_server.runs.worker import ThreadedWorker
from wire import initializer_of, synthetic_adapter

STOPS: dict[str, tuple[type, str, bool]] = {  # step: class, method, stop after calling it
    "check": (ThreadedWorker, "_check", False),
    "publish": (RunArtifacts, "publish_upload", True),
    "record": (SqliteStore, "record_upload", True),
    "aggregate": (ThreadedWorker, "_add_checked", False),
}


def stop_at(step: str) -> None:
    """Make ``step`` block its thread forever (announcing it) the first time it runs."""
    owner, name, after = STOPS[step]
    original = getattr(owner, name)

    def stopping(self: Any, *args: Any, **kwargs: Any) -> Any:
        if after:
            original(self, *args, **kwargs)
        print(f"stopped at {step}", flush=True)
        threading.Event().wait()  # until the test kills the process

    setattr(owner, name, stopping)


async def run(config: str) -> int:
    settings = load_settings(["--config", config])
    started: asyncio.Future[FederationServer] = asyncio.get_running_loop().create_future()
    serving = asyncio.ensure_future(
        serve(settings, initializer=initializer_of(synthetic_adapter()), started=started)
    )
    await asyncio.wait({started, serving}, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        return await serving  # it failed to start: raise its error
    server = started.result()
    print(f"serving {server.spec.run_id} on port {server.port}", flush=True)
    return await serving


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--stop-at", choices=sorted(STOPS))
    arguments = parser.parse_args()
    if arguments.stop_at:
        stop_at(arguments.stop_at)
    sys.exit(asyncio.run(run(arguments.config)))
