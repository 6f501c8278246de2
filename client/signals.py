"""SIGTERM and SIGINT for a client process: set the stop event, cancel the call in flight.

Used by the daemon's entry point and by :func:`fedrot_client.connect` (in the main thread
only: Python delivers signals there). A handler sets ``stop``; a watcher thread then cancels
the transport's calls, so a long poll or a transfer ends at once. While ``raise_now()`` is
true (the federation's user is running their own training code) the handler also raises
:class:`~fedrot_client.errors.Stopped` in the main thread, so that a training loop that never
calls back into the SDK stops too.
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

    def install(self) -> bool:
        """Install the handlers; False (nothing installed) outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._previous = {number: signal.signal(number, self._on_signal)
                          for number in STOP_SIGNALS}  # fmt: skip
        threading.Thread(target=self._watch, name="stop-watcher", daemon=True).start()
        return True

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _on_signal(self, number: int, _frame: object) -> None:
        name = signal.Signals(number).name
        logger.info("received %s; stopping", name)
        self._stop.set()
        if self._raise_now():
            raise Stopped(name)

    def _watch(self) -> None:
        self._stop.wait()
        self._transport.cancel()


def raise_stopped(stop: threading.Event, cause: Interrupted) -> NoReturn:
    """An interrupted call during a stop becomes :class:`Stopped`; otherwise ``cause``."""
    if stop.is_set():
        raise Stopped(str(cause)) from cause
    raise cause
