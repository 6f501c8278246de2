"""Serve the dashboard with uvicorn inside the federation server's asyncio loop.

:func:`start_dashboard` binds the socket itself (so ``host:0`` works and the bound port is
known at once), starts ``uvicorn.Server.serve`` as a task and logs ``dashboard on port N``;
:meth:`DashboardServer.stop` shuts it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves the signals to the federation server's entry point."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass
class DashboardServer:
    """A running dashboard: ``port`` is the bound port; ``resources`` (its state readers) are
    closed when it stops."""

    server: uvicorn.Server
    task: asyncio.Task[None]
    sock: socket.socket
    port: int
    resources: Sequence[Closable] = field(default_factory=tuple)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Ask uvicorn to exit; cancel it when it has not within ``timeout_s``."""
        self.server.should_exit = True
        done, _ = await asyncio.wait({self.task}, timeout=timeout_s)
        if not done:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.sock.close()
        for resource in self.resources:
            resource.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (IPv6 when ``host`` has a colon)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def start_dashboard(
    app: FastAPI, host: str, port: int, resources: Sequence[Closable] = ()
) -> DashboardServer:
    """Bind ``host:port`` and serve ``app`` there on the running loop until stopped."""
    sock = bind(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2)  # fmt: skip
    server = QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="fedrot-dashboard")
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if task.done():
        sock.close()
        task.result()  # re-raise why it could not start
        raise RuntimeError("the dashboard stopped while starting")
    bound = sock.getsockname()[1]
    logger.info("dashboard on port %s (http://%s:%s/)", bound, host, bound)
    return DashboardServer(server, task, sock, bound, tuple(resources))
