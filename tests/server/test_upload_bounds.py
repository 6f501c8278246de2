"""Upload sizes are bounded by the run's adapter schema, not only by ``max_upload_bytes``: a header
declaring more than the largest encoding of an update of the round's trained factors
(``fedrot.codec.max_encoded_size``) is RESOURCE_EXHAUSTED before any chunk is read, and the
bytes held for a resume stay within that bound (a new header cannot raise it, a resume cannot
grow past it). Real gRPC on loopback, port 0."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from fedrot.adapters import AdapterSchema, Factor
from fedrot.codec import max_encoded_size
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.service import FederationServer
from server_state import snapshot
from wire import (
    MIB,
    WireClient,
    chunk_messages,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    trained_of,
    upload_header,
)

CHUNK = 256
HELD_CHUNKS = 2
INITIAL = synthetic_adapter()
WAIT_S = 20.0


async def ready(
    server: FederationServer, name: str = "alice"
) -> tuple[WireClient, frozenset[Factor], bytes]:
    """``name`` enrolled with its round-0 task: the trained factors and an update for them."""
    client = WireClient(server.address, token_of(name))
    await client.enroll()
    task = (await client.get_task()).train
    return client, trained_of(task), await client.update_for(task, seed=1)


def bound_of(trained: frozenset[Factor]) -> int:
    return max_encoded_size(AdapterSchema.of(INITIAL), trained)


async def header_then_silence(
    client: WireClient, header: pb.UploadUpdateRequest
) -> grpc.aio.AioRpcError:
    """Send ``header`` and no chunk: the server must answer without reading a byte of payload."""
    never = asyncio.Event()

    async def stream() -> AsyncIterator[pb.UploadUpdateRequest]:
        yield header
        await never.wait()

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async with asyncio.timeout(WAIT_S):
            await client.stub.UploadUpdate(stream(), metadata=client.metadata)
    return refused.value


async def held(client: WireClient, payload: bytes, key: str) -> int:
    request = pb.QueryUploadRequest(run_id=client.run_id, round=0, idempotency_key=key,
                                    total_size=len(payload),
                                    sha256=hashlib.sha256(payload).hexdigest())  # fmt: skip
    return (await client.stub.QueryUpload(request, metadata=client.metadata)).bytes_received


def test_a_size_above_the_schema_bound_is_refused_before_any_chunk(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"], min_clients=1, rounds=1)  # max_upload: 1 GiB

    async def scenario() -> None:
        async with running_server(settings, INITIAL) as server:
            alice, trained, payload = await ready(server)
            bound = bound_of(trained)
            assert len(payload) <= bound < settings.max_upload_bytes
            before = snapshot(server)
            for size in (bound + 1, 296 * MIB):
                header = upload_header(alice.run_id, 0, payload, trained, sample_count=10,
                                       metrics={}, total_size=size)  # fmt: skip
                error = await header_then_silence(alice, header)
                assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                assert f"upload of {size} bytes exceeds {bound} bytes" in error.details()
                assert "adapter schema" in error.details()
                assert not before.differences(snapshot(server))
            assert len(server.engine._round.partials) == 0  # noqa: SLF001
            # At the bound itself the header passes; the stream then ends without a chunk.
            header = upload_header(alice.run_id, 0, payload, trained, sample_count=10,
                                   metrics={}, total_size=bound)  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as short:
                await alice.upload_messages([header])
            assert short.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert f"stream ended after 0 of {bound} bytes" in short.value.details()
            reply = await alice.upload(0, payload, trained, chunk_bytes=CHUNK)
            assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
            await alice.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_held_bytes_stay_within_the_bound(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"], min_clients=1, rounds=1)

    async def scenario() -> None:
        async with running_server(settings, INITIAL) as server:
            alice, trained, payload = await ready(server)
            bound, chunks = bound_of(trained), chunk_messages(payload, CHUNK)
            header = upload_header(alice.run_id, 0, payload, trained, sample_count=10,
                                   metrics={}, key="key-1")  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError):  # the stream ends early: bytes held
                await alice.upload_messages([header, *chunks[:HELD_CHUNKS]])
            kept = HELD_CHUNKS * CHUNK
            assert await held(alice, payload, "key-1") == kept
            partials = server.engine._round.partials  # noqa: SLF001 - the test looks inside

            # The same key declaring more than the bound: refused, the held bytes untouched.
            bigger = upload_header(alice.run_id, 0, payload, trained, sample_count=10,
                                   metrics={}, key="key-1", total_size=bound + 1)  # fmt: skip
            error = await header_then_silence(alice, bigger)
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await held(alice, payload, "key-1") == kept and partials.total_bytes == kept

            # A resume that sends more than the announced size cannot grow the partial.
            tail = pb.UploadUpdateRequest(chunk=pb.Chunk(offset=len(payload), data=b"\x00" * 64))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await alice.upload_messages([header, *chunks[HELD_CHUNKS:], tail])
            assert "beyond the announced total_size" in refused.value.details()
            assert partials.total_bytes == len(payload) <= bound

            reply = await alice.upload_messages([header, *chunks])
            assert reply.status == pb.UPLOAD_STATUS_ACCEPTED and partials.total_bytes == 0
            await alice.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_withdrawal_drops_the_bytes_held_for_the_client(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice", "bob"], min_clients=2, rounds=1)

    async def scenario() -> None:
        async with running_server(settings, INITIAL) as server:
            (alice, trained, payload), (bob, _, _) = await asyncio.gather(
                ready(server), ready(server, "bob")
            )
            header = upload_header(alice.run_id, 0, payload, trained, sample_count=10,
                                   metrics={}, key="key-1")  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError):  # the stream ends early: bytes held
                await alice.upload_messages([header, *chunk_messages(payload, CHUNK)[:1]])
            partials = server.engine._round.partials  # noqa: SLF001 - the test looks inside
            assert partials.total_bytes == CHUNK
            await alice.heartbeat(0, pb.CLIENT_PHASE_WITHDRAWN)
            assert partials.total_bytes == 0
            for client in (alice, bob):
                await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
