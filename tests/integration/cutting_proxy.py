"""A loopback TCP proxy for the fault tests: it forwards every connection to a settable
upstream port and, on command, cuts them all (both sides aborted, as when a link drops).

``CuttingProxy`` runs its own asyncio loop in a background thread, listens on 127.0.0.1 port 0,
and can be re-pointed at a restarted server (``upstream_port``). ``cut_after(n)`` cuts every
open connection once ``n`` more bytes went through, so the cut lands in the middle of whatever
streams then. Importable as ``cutting_proxy`` (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import threading


class CuttingProxy:
    """See the module docstring; ``cuts`` counts the cuts made."""

    def __init__(self, upstream_port: int = 0) -> None:
        self.upstream_port = upstream_port
        self.cuts = 0
        self._budget: int | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cutting-proxy",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Cut every open connection now."""
        self._loop.call_soon_threadsafe(self._cut_all)

    def cut_after(self, byte_count: int) -> None:
        """Cut every open connection once ``byte_count`` more bytes were relayed."""
        self._loop.call_soon_threadsafe(setattr, self, "_budget", byte_count)

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            self._cut_all()
            await self._server.wait_closed()

        try:
            self._call(shut())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _call(self, coroutine):  # noqa: ANN001, ANN202
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            for side in (writer, up_writer):
                self._writers.discard(side)
                side.transport.abort()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(64 * 1024):
                sink.write(data)
                await sink.drain()
                if self._budget is not None:
                    self._budget -= len(data)
                    if self._budget <= 0:
                        self._budget = None
                        self._cut_all()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()

    def _cut_all(self) -> None:
        self.cuts += 1
        for writer in list(self._writers):
            writer.transport.abort()
