"""Chunk reassembly into a spool draft (hashed and written on the receiver's thread), and
slicing for download."""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedrot_server.storage import artifacts
from fedrot_server.storage.artifacts import SpoolDraft
from fedrot_server.errors import IncompleteUploadError, InvalidRequestError, TooLargeError
from fedrot_server.rpc.transfers import Announced, PayloadReceiver, payload_chunks

DATA = bytes(range(256)) * 40


def receiver(folder: Path, data: bytes = DATA, max_chunk: int = 4096) -> PayloadReceiver:
    return PayloadReceiver(Announced(len(data), hashlib.sha256(data).hexdigest()),
                           max_chunk_bytes=max_chunk, sink=SpoolDraft(folder / "draft.part"))  # fmt: skip


def feed(r: PayloadReceiver, data: bytes, start: int, end: int, chunk: int) -> None:
    for offset in range(start, end, chunk):
        r.add(offset, data[offset : min(offset + chunk, end)])


@pytest.mark.parametrize("chunk", [1000, 4096, 333])
def test_slices_reassemble_into_the_draft(tmp_path: Path, chunk: int) -> None:
    pieces = list(payload_chunks(DATA, offset=0, chunk_bytes=chunk))
    assert all(len(p) <= chunk for _, p in pieces)
    r = receiver(tmp_path)

    async def scenario() -> bytes:
        for offset, data in pieces:
            r.add(offset, data)
            await r.settle(2 * chunk)
        payload = await r.finish()
        return bytes(payload.data)

    assert asyncio.run(scenario()) == DATA
    assert (tmp_path / "draft.part").read_bytes() == DATA
    tail = list(payload_chunks(DATA, offset=5000, chunk_bytes=chunk))
    assert tail[0][0] == 5000 and b"".join(p for _, p in tail) == DATA[5000:]


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="offset"):
        payload_chunks(DATA, offset=len(DATA) + 1, chunk_bytes=10)
    r = receiver(tmp_path)
    with pytest.raises(InvalidRequestError, match="in order"):
        r.add(10, DATA[10:20])
    with pytest.raises(TooLargeError):
        r.add(0, DATA[:5000])
    with pytest.raises(InvalidRequestError, match="empty chunk"):
        r.add(0, b"")
    r.add(0, DATA[:4000])
    with pytest.raises(IncompleteUploadError, match="after 4000"):
        asyncio.run(r.finish())
    r.add(4000, DATA[4000:8000])
    r.add(8000, DATA[8000:10000])
    with pytest.raises(InvalidRequestError, match="beyond"):
        r.add(10000, DATA[10000:] + b"x")
    bad = PayloadReceiver(Announced(3, "0" * 64), max_chunk_bytes=10,
                          sink=SpoolDraft(tmp_path / "bad.part"))  # fmt: skip
    bad.add(0, b"abc")
    with pytest.raises(InvalidRequestError, match="sha256 mismatch"):
        asyncio.run(bad.finish())
    bad.discard()
    assert not (tmp_path / "bad.part").exists()
    with pytest.raises(InvalidRequestError, match="total_size"):
        PayloadReceiver(Announced(0, "0" * 64), max_chunk_bytes=10,
                        sink=SpoolDraft(tmp_path / "none.part"))  # fmt: skip


@pytest.mark.parametrize("cut", [1, 999, 4096, 6000, len(DATA) - 1])
def test_a_resumed_stream_continues_the_running_hash(tmp_path: Path, cut: int) -> None:
    """A stream cut at ``cut``: the next one resumes there (a different chunking) and the
    payload verifies; a stream that starts over at 0 forgets the held bytes and their hash."""
    r = receiver(tmp_path)

    async def scenario() -> bytes:
        feed(r, DATA, 0, cut, 1000)
        await r.drain()  # the stream broke off: what it took is stored, then held
        assert r.received == cut
        r.resume_at(cut)
        feed(r, DATA, cut, len(DATA), 777)
        return bytes((await r.finish()).data)

    assert asyncio.run(scenario()) == DATA

    again = receiver(tmp_path / "again")

    async def start_over() -> bytes:
        feed(again, b"\xff" * cut, 0, cut, 1000)  # bytes of no payload at all
        await again.drain()
        again.resume_at(0)
        assert again.received == 0
        feed(again, DATA, 0, len(DATA), 4096)
        return bytes((await again.finish()).data)

    assert asyncio.run(start_over()) == DATA
    assert (tmp_path / "again" / "draft.part").read_bytes() == DATA


class FailingDraft(SpoolDraft):
    """A draft whose third write fails (the disk is full)."""

    writes = 0

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        if self.writes == 3:
            raise OSError(28, "No space left on device")
        super().write(offset, data)


def test_a_failed_write_is_raised_and_the_receiver_then_holds_nothing(tmp_path: Path) -> None:
    r = PayloadReceiver(Announced(len(DATA), hashlib.sha256(DATA).hexdigest()),
                        max_chunk_bytes=1000, sink=FailingDraft(tmp_path / "full.part"))  # fmt: skip

    async def scenario() -> None:
        feed(r, DATA, 0, 5000, 1000)
        with pytest.raises(OSError, match="No space"):
            await r.settle(0)
        assert r.received == 0

    asyncio.run(scenario())


def test_a_draft_is_published_whole_or_not_at_all(tmp_path: Path) -> None:
    draft = SpoolDraft(tmp_path / "incoming" / "a.part")
    draft.write(0, b"hello ")
    draft.write(6, b"world")
    target = tmp_path / "rounds" / "0" / "uploads" / "a.safetensors"
    assert not target.exists()
    assert draft.publish(target) == target
    assert target.read_bytes() == b"hello world"
    assert not (tmp_path / "incoming" / "a.part").exists()
    draft.discard()  # once published: nothing to remove
    assert target.read_bytes() == b"hello world"

    dropped = SpoolDraft(tmp_path / "incoming" / "b.part")
    dropped.write(0, b"partial")
    dropped.truncate()
    assert (tmp_path / "incoming" / "b.part").read_bytes() == b""
    dropped.discard()
    assert not (tmp_path / "incoming" / "b.part").exists()


def test_the_contents_map_never_writes_through(tmp_path: Path) -> None:
    """The decoder gets a copy-on-write map of the draft: writing to it (an aggregator that
    works in place) leaves the spool file as received."""
    draft = SpoolDraft(tmp_path / "c.part")
    draft.write(0, b"\x00" * 4096)
    mapped = draft.contents()
    mapped[0:4] = b"\x01\x02\x03\x04"
    draft.publish(tmp_path / "c.safetensors")
    assert (tmp_path / "c.safetensors").read_bytes() == b"\x00" * 4096


def test_a_failed_writeback_fails_the_upload_not_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write-back error is reported once per open file: the background fdatasync that sees
    it must pass it on (to the next write, or to sync), or the fsync before the
    acknowledgement would succeed over lost bytes."""

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(artifacts, "WRITEBACK_BYTES", 4)
    monkeypatch.setattr(artifacts.os, "fdatasync", failing)
    with ThreadPoolExecutor(max_workers=1) as writeback:
        draft = SpoolDraft(tmp_path / "d.part", writeback)
        draft.write(0, b"12345")  # starts a write-back, which fails
        with pytest.raises(OSError, match="Input/output"):
            draft.sync()
        later = SpoolDraft(tmp_path / "e.part", writeback)
        later.write(0, b"12345")
        assert later._flushing is not None  # noqa: SLF001 - a write-back started
        later._flushing.exception()  # noqa: SLF001 - wait for it to fail
        with pytest.raises(OSError, match="Input/output"):
            later.write(5, b"67890")
        draft.discard()
        later.discard()
