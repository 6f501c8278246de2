"""Resumable uploads over real gRPC: a stream cut after some chunks (the server abandons it as
stalled, or the client cancels it) leaves its bytes on the server; QueryUpload tells how many,
and a stream of the same header resumes there. The round's aggregate equals the uncut one's; a
wrong offset is refused (OUT_OF_RANGE, naming the held offset) and changes nothing; another
update under the same key starts over instead of mixing bytes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fedrot.adapters import Factor
from fedrot.codec import encode_adapter
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.service import FederationServer
from fedrot_server.rpc.transfers import PayloadReceiver
from server_state import snapshot
from wire import (
    WireClient,
    adapter_of,
    assert_same,
    chunk_messages,
    core_aggregate,
    encode_update,
    local_update,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    trained_of,
    upload_header,
)

CHUNK = 256
HELD_CHUNKS = 2  # chunks the server takes before the cut
INITIAL = synthetic_adapter()
WAIT_S = 20.0  # a bound on every wait, so a broken test fails instead of hanging
SAMPLES = {"alice": 10, "bob": 30}


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """``(offset, length)`` of every chunk a server-side receiver took, in order."""
    taken: list[tuple[int, int]] = []
    add = PayloadReceiver.add

    def spy(self: PayloadReceiver, offset: int, data: bytes) -> None:
        add(self, offset, data)
        taken.append((offset, len(data)))

    monkeypatch.setattr(PayloadReceiver, "add", spy)
    yield taken


@dataclass
class Round0:
    """alice and bob in round 0 of a one-round run, each with an update to upload."""

    server: FederationServer
    alice: WireClient
    bob: WireClient
    trained: frozenset[Factor]
    updates: dict[str, bytes]

    def header(self, name: str, payload: bytes, key: str) -> pb.UploadUpdateRequest:
        return upload_header(self.alice.run_id, 0, payload, self.trained,
                             sample_count=SAMPLES[name], metrics={}, key=key)  # fmt: skip

    async def query(self, payload: bytes, key: str) -> pb.QueryUploadResponse:
        request = pb.QueryUploadRequest(run_id=self.alice.run_id, round=0, idempotency_key=key,
                                        total_size=len(payload),
                                        sha256=hashlib.sha256(payload).hexdigest())  # fmt: skip
        return await self.alice.stub.QueryUpload(request, metadata=self.alice.metadata)

    def expected(self) -> object:
        uploads = [(name, self.updates[name], SAMPLES[name]) for name in ("alice", "bob")]
        return core_aggregate("fedrot", 0, INITIAL, uploads)

    async def finish(self) -> None:
        """bob uploads; the round closes, the run is done, and its adapter is the core's
        aggregate of alice's and bob's updates."""
        reply = await self.bob.upload(0, self.updates["bob"], self.trained,
                                      sample_count=SAMPLES["bob"])  # fmt: skip
        assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
        assert (await self.alice.get_task()).WhichOneof("task") == "done"
        assert_same(adapter_of(await self.alice.download(1)), self.expected())


async def round0(server: FederationServer) -> Round0:
    alice, bob = (WireClient(server.address, token_of(n)) for n in ("alice", "bob"))
    for client in (alice, bob):
        await client.enroll()
    tasks = [(await client.get_task()).train for client in (alice, bob)]
    trained = trained_of(tasks[0])
    reference = adapter_of(await alice.download(0))
    updates = {name: encode_update(local_update(reference, trained, seed=seed))
               for name, seed in (("alice", 1), ("bob", 2))}  # fmt: skip
    assert len(updates["alice"]) > (HELD_CHUNKS + 2) * CHUNK
    return Round0(server, alice, bob, trained, updates)


async def cut_upload(
    r: Round0, payload: bytes, key: str, how: str, seen: list[tuple[int, int]]
) -> None:
    """alice sends the header and HELD_CHUNKS chunks, then her stream breaks: ``"stall"``, the
    link goes silent (the server abandons it); ``"cancel"``, she cancels the call once the
    server took those chunks."""
    header, chunks = r.header("alice", payload, key), chunk_messages(payload, CHUNK)
    silent = asyncio.Event()
    already = len(seen)

    async def stream() -> AsyncIterator[pb.UploadUpdateRequest]:
        yield header
        for message in chunks[:HELD_CHUNKS]:
            yield message
        await silent.wait()

    call = r.alice.stub.UploadUpdate(stream(), metadata=r.alice.metadata)
    try:
        if how == "cancel":
            async with asyncio.timeout(WAIT_S):
                while len(seen) < already + HELD_CHUNKS:
                    await asyncio.sleep(0.01)
            call.cancel()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)) as broken:
            await call
        if how == "stall":
            assert broken.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        silent.set()


def settings_of(tmp_path: Path) -> object:
    return make_settings(tmp_path, ["alice", "bob"], rounds=1, upload_stall_s=0.5)


@pytest.mark.parametrize("how", ["stall", "cancel"])
def test_a_cut_upload_resumes_from_the_held_offset(
    tmp_path: Path, seen: list[tuple[int, int]], how: str
) -> None:
    async def scenario() -> None:
        async with running_server(settings_of(tmp_path), INITIAL) as server:
            r = await round0(server)
            payload = r.updates["alice"]
            await cut_upload(r, payload, "key-1", how, seen)
            held = await r.query(payload, "key-1")
            assert held.bytes_received == HELD_CHUNKS * CHUNK
            assert held.status == pb.UPLOAD_STATUS_UNSPECIFIED
            assert server.store.uploads(server.spec.run_id, 0) == []

            first = len(seen)
            rest = chunk_messages(payload, CHUNK)[HELD_CHUNKS:]
            reply = await r.alice.upload_messages([r.header("alice", payload, "key-1"), *rest])
            assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
            assert reply.bytes_received == len(payload)
            assert seen[first][0] == HELD_CHUNKS * CHUNK  # the resumed stream's first chunk
            assert sum(length for _, length in seen) == len(payload)  # every byte taken once

            accepted = await r.query(payload, "key-1")
            assert accepted.status == pb.UPLOAD_STATUS_ACCEPTED
            assert (accepted.bytes_received, accepted.upload_id) == (len(payload), reply.upload_id)
            await r.finish()
            rows = server.store.uploads(server.spec.run_id, 0)
            assert [u.client for u in rows] == ["alice", "bob"]

    asyncio.run(scenario())


def test_a_resume_at_another_offset_is_refused_and_changes_nothing(
    tmp_path: Path, seen: list[tuple[int, int]]
) -> None:
    async def scenario() -> None:
        async with running_server(settings_of(tmp_path), INITIAL) as server:
            r = await round0(server)
            payload = r.updates["alice"]
            header, chunks = r.header("alice", payload, "key-1"), chunk_messages(payload, CHUNK)
            await cut_upload(r, payload, "key-1", "stall", seen)
            before = snapshot(server)
            for wrong in (HELD_CHUNKS + 1, HELD_CHUNKS - 1):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await r.alice.upload_messages([header, *chunks[wrong:]])
                assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
                assert f"resume at offset {HELD_CHUNKS * CHUNK}" in refused.value.details()
                assert f"resumed at offset {wrong * CHUNK}" in refused.value.details()
            assert not before.differences(snapshot(server))
            assert (await r.query(payload, "key-1")).bytes_received == HELD_CHUNKS * CHUNK

            reply = await r.alice.upload_messages([header, *chunks[HELD_CHUNKS:]])
            assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
            await r.finish()

    asyncio.run(scenario())


def test_another_update_under_the_same_key_starts_over(
    tmp_path: Path, seen: list[tuple[int, int]]
) -> None:
    """The held bytes are of an earlier encoding of alice's update (other size and sha256);
    the header of the new one drops them: resuming it mid-way is refused, offset 0 counts."""

    async def scenario() -> None:
        async with running_server(settings_of(tmp_path), INITIAL) as server:
            r = await round0(server)
            payload = r.updates["alice"]
            tensors = local_update(adapter_of(await r.alice.download(0)), r.trained, seed=7)
            earlier = encode_adapter(tensors, {"producer": "tests", "attempt": "earlier"})
            assert len(earlier) != len(payload)
            assert earlier[: HELD_CHUNKS * CHUNK] != payload[: HELD_CHUNKS * CHUNK]
            await cut_upload(r, earlier, "key-1", "stall", seen)
            assert (await r.query(earlier, "key-1")).bytes_received == HELD_CHUNKS * CHUNK
            assert (await r.query(payload, "key-1")).bytes_received == 0

            header, chunks = r.header("alice", payload, "key-1"), chunk_messages(payload, CHUNK)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await r.alice.upload_messages([header, *chunks[HELD_CHUNKS:]])
            assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert "holds no bytes of it: send from offset 0" in refused.value.details()
            assert (await r.query(earlier, "key-1")).bytes_received == 0  # dropped

            first = len(seen)
            reply = await r.alice.upload_messages([header, *chunks])
            assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
            assert seen[first][0] == 0
            await r.finish()

    asyncio.run(scenario())


def test_a_stream_from_offset_zero_starts_the_same_update_over(
    tmp_path: Path, seen: list[tuple[int, int]]
) -> None:
    async def scenario() -> None:
        async with running_server(settings_of(tmp_path), INITIAL) as server:
            r = await round0(server)
            payload = r.updates["alice"]
            await cut_upload(r, payload, "key-1", "stall", seen)
            first = len(seen)
            reply = await r.alice.upload(0, payload, r.trained, sample_count=SAMPLES["alice"],
                                         key="key-1", chunk_bytes=CHUNK, metrics={})  # fmt: skip
            assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
            assert seen[first][0] == 0 and sum(n for _, n in seen[first:]) == len(payload)
            await r.finish()

    asyncio.run(scenario())


def test_the_held_bytes_go_with_their_round(tmp_path: Path, seen: list[tuple[int, int]]) -> None:
    """alice's cut upload is held in round 0; the operator closes round 0 with bob's update:
    the bytes are dropped, and round 0 takes no resume."""

    async def scenario() -> None:
        settings = make_settings(tmp_path, ["alice", "bob"], rounds=2, upload_stall_s=0.5)
        async with running_server(settings, INITIAL) as server:
            r = await round0(server)
            payload = r.updates["alice"]
            await cut_upload(r, payload, "key-1", "stall", seen)
            first_round = server.engine._round  # noqa: SLF001 - the test looks inside on purpose
            assert first_round is not None and len(first_round.partials) == 1
            await r.bob.upload(0, r.updates["bob"], r.trained, sample_count=SAMPLES["bob"])
            await server.engine.close_round()
            assert (await r.alice.get_task()).train.round == 1
            assert first_round.closed and len(first_round.partials) == 0
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await r.query(payload, "key-1")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    asyncio.run(scenario())
