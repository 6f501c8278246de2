"""Chunk reassembly and slicing."""

from __future__ import annotations

import hashlib

import pytest

from fedrot_server.errors import InvalidRequestError, TooLargeError
from fedrot_server.transfers import Announced, PayloadReceiver, payload_chunks

DATA = bytes(range(256)) * 40


def receiver(data: bytes = DATA, **kw: int) -> PayloadReceiver:
    return PayloadReceiver(Announced(len(data), hashlib.sha256(data).hexdigest()),
                           max_chunk_bytes=kw.get("max_chunk", 4096))  # fmt: skip


@pytest.mark.parametrize("chunk", [1000, 4096, 333])
def test_slices_reassemble(chunk: int) -> None:
    pieces = list(payload_chunks(DATA, offset=0, chunk_bytes=chunk))
    assert all(len(p) <= chunk for _, p in pieces)
    r = receiver()
    for offset, data in pieces:
        r.add(offset, data)
    assert r.finish() == DATA
    tail = list(payload_chunks(DATA, offset=5000, chunk_bytes=chunk))
    assert tail[0][0] == 5000 and b"".join(p for _, p in tail) == DATA[5000:]


def test_refusals() -> None:
    with pytest.raises(InvalidRequestError, match="offset"):
        payload_chunks(DATA, offset=len(DATA) + 1, chunk_bytes=10)
    r = receiver()
    with pytest.raises(InvalidRequestError, match="in order"):
        r.add(10, DATA[10:20])
    with pytest.raises(TooLargeError):
        r.add(0, DATA[:5000])
    with pytest.raises(InvalidRequestError, match="empty chunk"):
        r.add(0, b"")
    r.add(0, DATA[:4000])
    with pytest.raises(InvalidRequestError, match="after 4000"):
        r.finish()
    r.add(4000, DATA[4000:8000])
    r.add(8000, DATA[8000:10000])
    with pytest.raises(InvalidRequestError, match="beyond"):
        r.add(10000, DATA[10000:] + b"x")
    bad = PayloadReceiver(Announced(3, "0" * 64), max_chunk_bytes=10)
    bad.add(0, b"abc")
    with pytest.raises(InvalidRequestError, match="sha256 mismatch"):
        bad.finish()
    with pytest.raises(InvalidRequestError, match="total_size"):
        PayloadReceiver(Announced(0, "0" * 64), max_chunk_bytes=10)
