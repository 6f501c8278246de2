"""SIGTERM and SIGINT for a client process: set the stop event, cancel the call in flight.

Used by the daemon's entry point and by :func:`fedrot_client.connect` (in the main thread
only: Python delivers signals there). A handler sets ``stop``; a watcher thread then cancels
the transport's calls, so a long poll or a transfer ends at once. While ``raise_now()`` is
true (an SDK federation is open) the handler also raises :class:`~fedrot_client.errors.Stopped`
in the main thread, so that a training loop that never calls back into the SDK, or a model
still loading, stops too.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from fedrot_client.errors import Interrupted, Stopped
from fedrot_client.transport import Transport

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
WATCH_POLL_S = 0.2


class StopSignals:
    """Installs the stop handlers (:meth:`install`) and puts the previous ones back
    (:meth:`restore`)."""

    def __init__(
        self,
        stop: threading.Event,
        transport: Transport,
        *,
        raise_now: Callable[[], bool] = lambda: False,
    ) -> None:
        self._stop = stop
        self._transport = transport
        self._raise_now = raise_now
        self._previous: dict[int, Any] = {}
        self._released = threading.Event()

    def install(self) -> bool:
        """Install the handlers; False (nothing installed) outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._previous = {number: signal.signal(number, self._on_signal)
                          for number in STOP_SIGNALS}  # fmt: skip
        self._released.clear()
        threading.Thread(target=self._watch, name="stop-watcher", daemon=True).start()
        return True

    def restore(self) -> None:
        """Put the previous handlers back; the watcher thread ends."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        self._released.set()

    def _on_signal(self, number: int, _frame: object) -> None:
        name = signal.Signals(number).name
        logger.info("received %s; stopping", name)
        self._stop.set()
        if self._raise_now():
            raise Stopped(name)

    def _watch(self) -> None:
        while not self._released.is_set():
            if self._stop.wait(WATCH_POLL_S):
                self._transport.cancel()
                return


def raise_stopped(stop: threading.Event, cause: Interrupted) -> NoReturn:
    """An interrupted call during a stop becomes :class:`Stopped`; otherwise ``cause``."""
    if stop.is_set():
        raise Stopped(str(cause)) from cause
    raise cause
