"""Chunked transfers: reassemble an upload from ordered chunks, slice a payload for download.

Transport-free: the servicer feeds chunks in and sends slices out. A payload is announced by its
total size and SHA-256 (lowercase hex); chunks must arrive in order, without gaps or overlap, no
larger than the chunk limit, and add up to exactly the announced size. A receiver outlives a
broken stream (see :mod:`fedrot_server.rpc.partials`): the next stream of the same payload resumes
where it stopped (:meth:`PayloadReceiver.resume_at`).

A receiver checks each chunk on the event loop and hands it to its own thread, which hashes it
(one running SHA-256 of the bytes so far, kept with the receiver across a cut) and writes it to
the receiver's sink (the server: a file of the spool, :class:`~fedrot_server.storage.artifacts.SpoolDraft`)
while the next chunk arrives; at most :data:`MAX_QUEUED_BYTES` wait for that thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedrot.codec import Buffer
from fedrot_server.errors import (
    IncompleteUploadError,
    InvalidRequestError,
    ResumeOffsetError,
    TooLargeError,
)

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_QUEUED_BYTES = 8 * 1024 * 1024


def sha256_hex(data: Buffer) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(value: str) -> str:
    """``value`` if it is 64 lowercase hex digits, else InvalidRequestError."""
    if not SHA256_HEX.fullmatch(value):
        raise InvalidRequestError(f"sha256 must be 64 lowercase hex digits, got {value[:80]!r}")
    return value


@dataclass(frozen=True)
class Announced:
    """What the sender promised: ``total_size`` bytes hashing to ``sha256``."""

    total_size: int
    sha256: str


class PayloadSink(Protocol):
    """Where a receiver's bytes go, written from the receiver's thread in order."""

    def write(self, offset: int, data: bytes) -> None:
        """Put ``data`` at ``offset``."""

    def truncate(self) -> None:
        """Forget every byte (the payload starts over)."""

    def contents(self) -> Buffer:
        """Every byte written, without a copy."""

    def sync(self) -> None:
        """Make every byte written durable."""

    def publish(self, path: Path) -> Path:
        """Durably move the bytes to ``path`` (once verified); the sink is then done."""

    def discard(self) -> None:
        """Drop the bytes (nothing once published); never blocks on I/O in progress."""


@dataclass(frozen=True)
class ReceivedPayload:
    """A whole, verified payload: ``data`` views its bytes in ``sink``."""

    data: Buffer
    sink: PayloadSink

    @property
    def size(self) -> int:
        return len(self.data)


class PayloadReceiver:
    """Collects the chunks of one announced payload into ``sink`` and verifies it at the end.

    :meth:`add` (event loop) checks a chunk and queues it for the receiver's thread;
    :meth:`settle` and :meth:`drain` wait for that thread; :meth:`finish` verifies the whole
    payload.
    """

    def __init__(self, announced: Announced, *, max_chunk_bytes: int, sink: PayloadSink) -> None:
        check_sha256(announced.sha256)
        if announced.total_size <= 0:
            raise InvalidRequestError(f"total_size must be > 0, got {announced.total_size}")
        self.announced = announced
        self.sink = sink
        self._max_chunk = max_chunk_bytes
        self._received = 0
        self._digest = hashlib.sha256()
        self._thread: ThreadPoolExecutor | None = None
        self._queued: deque[tuple[int, Future[None]]] = deque()
        self._queued_bytes = 0
        self._error: BaseException | None = None
        self.delivered = False  # finish() handed the bytes over: their new holder disposes

    @property
    def received(self) -> int:
        """Bytes taken so far (some may still be on their way to the sink)."""
        return self._received

    @property
    def complete(self) -> bool:
        """Whether every announced byte arrived (the payload can be verified)."""
        return self.received == self.announced.total_size

    def resume_at(self, offset: int) -> None:
        """Take the first chunk offset of a new stream: the bytes held so far (continue), or 0
        (start over, forgetting them). Any other offset is refused and changes nothing, so the
        sender can ask again where to resume."""
        if offset == self.received:
            return
        if offset != 0 and not self.received:
            raise ResumeOffsetError(
                f"upload starts at offset {offset}, but the server holds no bytes of it: "
                f"send from offset 0"
            )
        if offset != 0:
            raise ResumeOffsetError(
                f"upload resumed at offset {offset}, but the server holds {self.received} bytes "
                f"of it: resume at offset {self.received} (or start over at 0)"
            )
        self._received = 0
        self._queue(0, self._restart)

    def add(self, offset: int, data: bytes) -> None:
        """Take one chunk; it must start where the previous one ended. Hashed and written on
        the receiver's thread (see :meth:`drain`)."""
        if offset != self.received:
            raise InvalidRequestError(
                f"chunk at offset {offset}, expected {self.received} (chunks must be in order)"
            )
        if not data:
            raise InvalidRequestError(f"empty chunk at offset {offset}")
        if len(data) > self._max_chunk:
            raise TooLargeError(f"chunk of {len(data)} bytes exceeds the limit {self._max_chunk}")
        end = self.received + len(data)
        if end > self.announced.total_size:
            raise InvalidRequestError(
                f"chunk ends at byte {end}, beyond the announced total_size "
                f"{self.announced.total_size}"
            )
        self._received = end
        self._queue(len(data), lambda: self._store(offset, data))

    async def settle(self, max_queued_bytes: int) -> None:
        """Wait until at most ``max_queued_bytes`` wait for the receiver's thread; the error of
        a failed write (see :meth:`drain`)."""
        await self._wait_while(lambda: self._queued_bytes > max_queued_bytes)
        if self._error is not None:
            raise self._error

    async def drain(self) -> None:
        """Wait until every chunk taken is hashed and written, then let the thread go. After a
        failed write the receiver holds nothing (its upload starts over); :meth:`settle` and
        :meth:`finish` raise that error. A cancelled wait leaves the queue as it was."""
        await self._wait_while(lambda: True)
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None

    async def _wait_while(self, more: Callable[[], bool]) -> None:
        while self._queued and (more() or self._error is not None):
            size, job = self._queued[0]
            await asyncio.wait({asyncio.wrap_future(job)})  # a cancelled wait leaves the job be
            self._queued.popleft()
            self._queued_bytes -= size
        if self._error is not None:
            self._received = 0

    async def finish(self) -> ReceivedPayload:
        """The whole payload, once every byte is stored and its size and SHA-256 match the
        announcement. The caller then owns the sink: it publishes or discards it."""
        await self.drain()
        if self._error is not None:
            raise self._error
        if self.received != self.announced.total_size:
            raise IncompleteUploadError(
                f"stream ended after {self.received} of {self.announced.total_size} bytes"
            )
        actual = self._digest.hexdigest()
        if actual != self.announced.sha256:
            raise InvalidRequestError(
                f"sha256 mismatch: announced {self.announced.sha256}, received {actual}"
            )
        payload = ReceivedPayload(self.sink.contents(), self.sink)
        self.delivered = True
        return payload

    def discard(self) -> None:
        """Drop the bytes held, unless :meth:`finish` handed them over (the receiver is not
        used again)."""
        if not self.delivered:
            self.sink.discard()

    def _queue(self, size: int, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrot-upload")
        self._queued.append((size, self._thread.submit(job)))
        self._queued_bytes += size

    # On the receiver's thread, in the order queued.

    def _store(self, offset: int, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            self.sink.write(offset, data)
            self._digest.update(data)
        except Exception as error:  # noqa: BLE001 - raised on the event loop by settle/finish
            self._error = error

    def _restart(self) -> None:
        self._digest = hashlib.sha256()
        self._error = None
        try:
            self.sink.truncate()
        except Exception as error:  # noqa: BLE001 - as in _store
            self._error = error


def payload_chunks(payload: bytes, *, offset: int, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, data)`` slices of ``payload`` from ``offset`` on, each ``<= chunk_bytes``.

    A bad ``offset`` raises InvalidRequestError here, before any slice is produced.
    """
    if not 0 <= offset <= len(payload):
        raise InvalidRequestError(f"offset {offset} is outside the payload of {len(payload)} bytes")
    view = memoryview(payload)
    return ((s, bytes(view[s : s + chunk_bytes])) for s in range(offset, len(payload), chunk_bytes))
