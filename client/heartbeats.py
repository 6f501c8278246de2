"""Heartbeats in a background thread while one round is worked on.

The server wants a ``Heartbeat`` every ``heartbeat_interval`` while a client holds a task: it
tells the server the client is alive and how far it got (phase and fraction), and the answer
tells the client whether its round is still open. One :class:`Heartbeats` serves one round;
``round_closed`` turns true once the server answers that it no longer accepts this client's
update for it.
"""

from __future__ import annotations

import logging
import threading

from fedrot_client.errors import Interrupted, RejectedError
from fedrot_client.transport import ROUND_GONE, Transport
from fedrot_proto.v1 import federation_pb2 as pb

logger = logging.getLogger(__name__)

STOP_WAIT_S = 1.0


class Heartbeats:
    """A background heartbeat for one round; :meth:`start` it, :meth:`stop` it (idempotent)."""

    def __init__(
        self, transport: Transport, run_id: str, round_index: int, interval_s: float
    ) -> None:
        self._transport = transport
        self._run_id = run_id
        self._round = round_index
        self._interval = interval_s
        self._phase = pb.CLIENT_PHASE_DOWNLOADING
        self._progress = 0.0
        self._done = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-round-{round_index}", daemon=True
        )

    @property
    def round_closed(self) -> bool:
        return self._closed.is_set()

    def report(self, phase: int, progress: float) -> None:
        """What the next heartbeat says: a ``ClientPhase`` and the fraction of it done."""
        self._phase, self._progress = phase, progress

    def start(self) -> Heartbeats:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating; waits at most ``STOP_WAIT_S`` for a heartbeat in flight (the thread
        is a daemon: a slow call ends on its own deadline, its answer unused)."""
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STOP_WAIT_S)

    def __enter__(self) -> Heartbeats:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while True:
            self._beat()
            if self._done.wait(self._interval):
                return

    def _beat(self) -> None:
        try:
            reply = self._transport.heartbeat(self._run_id, self._round, self._phase,
                                              self._progress)  # fmt: skip
        except RejectedError as exc:
            if exc.code in ROUND_GONE:  # the run or round is gone (a restarted server)
                self._close(f"the server no longer knows it: {exc.details}")
            logger.debug("heartbeat for round %s failed: %s", self._round, exc)
            return
        except Interrupted as exc:
            logger.debug("heartbeat for round %s failed: %s", self._round, exc)
            return
        interval = reply.heartbeat_interval.ToNanoseconds() / 1e9
        if interval > 0:
            self._interval = interval
        if not reply.round_open:
            self._close("the server closed it for this client")

    def _close(self, why: str) -> None:
        if not self._closed.is_set():
            logger.warning("round %s: %s", self._round, why)
            self._closed.set()
