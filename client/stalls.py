"""Transfer timeouts that fire when progress stops, not after a wall-clock time set by size.

A transfer of any size may take as long as it keeps moving: :class:`StallWatch` cancels a call
once no chunk moved for ``limit_s`` seconds, and the caller turns that into :class:`Stalled`,
a retryable error (the transport then resumes the download from the bytes it has, or the
upload from the bytes the server holds, under the same idempotency key).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc


class Stalled(grpc.RpcError):
    """A transfer made no progress for too long; retried like DEADLINE_EXCEEDED."""

    def __init__(self, method: str, idle_s: float) -> None:
        super().__init__(f"{method}: no progress for {idle_s:.1f}s")
        self._details = f"no progress for {idle_s:.1f}s"

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return self._details


class StallWatch:
    """Cancels a call when :meth:`progress` was not called for ``limit_s`` seconds.

    Use ``with watch.guarding(call.cancel): ...`` around the call; :meth:`progress` may be
    called from any thread (e.g. gRPC's request-iterator thread), optionally with a new limit
    for the next phase (waiting for the answer after the last chunk). ``stalled`` tells
    afterwards whether the watch fired.
    """

    def __init__(self, limit_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if limit_s <= 0:
            raise ValueError(f"a stall limit must be > 0 seconds, got {limit_s}")
        self.limit_s = limit_s
        self.stalled = False
        self._clock = clock
        self._last = clock()
        self._done = threading.Event()

    def progress(self, limit_s: float | None = None) -> None:
        """Something moved now; ``limit_s`` replaces the limit from here on."""
        if limit_s is not None:
            self.limit_s = limit_s
        self._last = self._clock()

    def guarding(self, cancel: Callable[[], object]) -> _Guard:
        return _Guard(self, cancel)

    def _watch(self, cancel: Callable[[], object]) -> None:
        while True:
            left = self._last + self.limit_s - self._clock()
            if left <= 0:
                self.stalled = True
                cancel()
                return
            if self._done.wait(left):
                return


class _Guard:
    """The context manager of :meth:`StallWatch.guarding`: a watcher thread while inside."""

    def __init__(self, watch: StallWatch, cancel: Callable[[], object]) -> None:
        self._watch = watch
        self._thread = threading.Thread(target=watch._watch, args=(cancel,), daemon=True,
                                        name="fedrot-stall-watch")  # fmt: skip

    def __enter__(self) -> StallWatch:
        self._watch.progress()
        self._thread.start()
        return self._watch

    def __exit__(self, *exc_info: object) -> None:
        self._watch._done.set()
        self._thread.join()
