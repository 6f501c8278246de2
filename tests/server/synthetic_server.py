"""``fedrot-server`` on the synthetic adapter of :mod:`wire`, as a process a test can SIGKILL.

``python synthetic_server.py CONFIG.json`` serves with the settings in the file and prints
``serving <run_id> on port <port>`` on stdout once it serves; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from fedrot_server.main import serve
from fedrot_server.service import FederationServer
from fedrot_server.settings import load_settings
from wire import initializer_of, synthetic_adapter


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
    sys.exit(asyncio.run(run(sys.argv[1])))
