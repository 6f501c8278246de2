"""Chunked transfers: reassemble an upload from ordered chunks, slice a payload for download.

Transport-free: the servicer feeds chunks in and sends slices out. A payload is announced by its
total size and SHA-256 (lowercase hex); chunks must arrive in order, without gaps or overlap, no
larger than the chunk limit, and add up to exactly the announced size. A receiver outlives a
broken stream (see :mod:`fedrot_server.partials`): the next stream of the same payload resumes
where it stopped (:meth:`PayloadReceiver.resume_at`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from fedrot_server.errors import (
    IncompleteUploadError,
    InvalidRequestError,
    ResumeOffsetError,
    TooLargeError,
)

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes) -> str:
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


class PayloadReceiver:
    """Collects the chunks of one announced payload and verifies it at the end."""

    def __init__(self, announced: Announced, *, max_chunk_bytes: int) -> None:
        check_sha256(announced.sha256)
        if announced.total_size <= 0:
            raise InvalidRequestError(f"total_size must be > 0, got {announced.total_size}")
        self.announced = announced
        self._max_chunk = max_chunk_bytes
        self._buffer = bytearray()
        self._digest = hashlib.sha256()

    @property
    def received(self) -> int:
        return len(self._buffer)

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
        self._buffer = bytearray()
        self._digest = hashlib.sha256()

    def add(self, offset: int, data: bytes) -> None:
        """Append one chunk; it must start where the previous one ended."""
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
        self._buffer += data
        self._digest.update(data)

    def finish(self) -> bytes:
        """The whole payload, once its size and SHA-256 match the announcement."""
        if self.received != self.announced.total_size:
            raise IncompleteUploadError(
                f"stream ended after {self.received} of {self.announced.total_size} bytes"
            )
        actual = self._digest.hexdigest()
        if actual != self.announced.sha256:
            raise InvalidRequestError(
                f"sha256 mismatch: announced {self.announced.sha256}, received {actual}"
            )
        return bytes(self._buffer)


def payload_chunks(payload: bytes, *, offset: int, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, data)`` slices of ``payload`` from ``offset`` on, each ``<= chunk_bytes``.

    A bad ``offset`` raises InvalidRequestError here, before any slice is produced.
    """
    if not 0 <= offset <= len(payload):
        raise InvalidRequestError(f"offset {offset} is outside the payload of {len(payload)} bytes")
    view = memoryview(payload)
    return ((s, bytes(view[s : s + chunk_bytes])) for s in range(offset, len(payload), chunk_bytes))
