"""An upload's file is written and hashed as its chunks arrive (a draft in the run's
``incoming/`` folder), and durability is unchanged: nothing is acknowledged before it is in the
spool and recorded. A server killed at any step between the last chunk and the
acknowledgement has not acknowledged the upload, holds no draft once restarted, and takes the
retry once; one killed after recording answers the retry as a duplicate, from a spool file
that holds the upload. A payload whose SHA-256 differs from its header's is refused and leaves
no file; so is a resumed stream whose held bytes and new bytes do not hash together to the
announced digest, while a true resume (another chunking across the cut) is accepted whole."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.settings import ServerSettings
from fedrot_server.storage.store import open_reader
from server_process import ServerProcess
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

INITIAL = synthetic_adapter()
CHUNK = 256
HELD_CHUNK = 128
WAIT_S = 30.0  # a bound on every wait, so a broken test fails instead of hanging
SAMPLES = {"alice": 10, "bob": 30}


def settings_of(tmp_path: Path) -> ServerSettings:
    return make_settings(tmp_path, ["alice", "bob"], rounds=1, linger_s=0.0,
                         final_download_grace_s=60.0, upload_stall_s=0.5)  # fmt: skip


def run_folder(settings: ServerSettings, run_id: str) -> Path:
    return settings.state_dir / "runs" / run_id


def drafts(settings: ServerSettings, run_id: str) -> list[Path]:
    return sorted((run_folder(settings, run_id) / "incoming").glob("*"))


def spool_file(settings: ServerSettings, run_id: str, client: str) -> Path:
    return run_folder(settings, run_id) / "rounds" / "0" / "uploads" / f"{client}.safetensors"


async def enrolled(address: str, run_id: str = "") -> tuple[dict[str, WireClient], dict[str, bytes], frozenset]:
    """alice and bob enrolled in round 0, each with an update for it."""
    clients = {name: WireClient(address, token_of(name), run_id=run_id) for name in SAMPLES}
    for client in clients.values():
        await client.enroll()
    tasks = [(await client.get_task(WAIT_S)).train for client in clients.values()]
    trained = trained_of(tasks[0])
    updates = {name: encode_update(local_update(INITIAL, trained, seed=seed))
               for seed, name in enumerate(SAMPLES, start=1)}  # fmt: skip
    return clients, updates, trained


async def upload(client: WireClient, name: str, payload: bytes, trained: frozenset,
                 **fields: object) -> pb.UploadUpdateResponse:
    return await client.upload(0, payload, trained, key=f"key-{name}",
                               sample_count=SAMPLES[name], chunk_bytes=CHUNK, **fields)  # fmt: skip


# A server killed between the last chunk and the acknowledgement.


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.kill()


async def killed_mid_commit(server: ServerProcess, step: str, update: bytes,
                            trained: frozenset) -> None:
    """alice (re)sends her update; its commit reaches ``step``; the server is then killed
    (SIGKILL) without having acknowledged it."""
    alice = WireClient(server.address, token_of("alice"), run_id=server.run_id)
    call = asyncio.ensure_future(upload(alice, "alice", update, trained))
    async with asyncio.timeout(WAIT_S):
        assert (await asyncio.to_thread(server.line)).strip() == f"stopped at {step}"
    assert not call.done()  # not acknowledged
    server.kill()
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    await alice.close()


def recorded_uploads(settings: ServerSettings, run_id: str) -> list[str]:
    reader = open_reader(settings.database_path)
    try:
        return [u.client for u in reader.uploads(run_id, 0)]
    finally:
        reader.close()


async def round0_updates(server: ServerProcess) -> tuple[dict[str, bytes], frozenset]:
    clients, updates, trained = await enrolled(server.address)
    for client in clients.values():
        await client.close()
    return updates, trained


async def finish(server: ServerProcess, updates: dict[str, bytes], trained: frozenset) -> bytes:
    """alice's retry is a duplicate (the last kill came after her upload was recorded); bob
    uploads; the round closes; returns the published adapter."""
    clients = {n: WireClient(server.address, token_of(n), run_id=server.run_id) for n in SAMPLES}
    retry = await upload(clients["alice"], "alice", updates["alice"], trained)
    assert retry.status == pb.UPLOAD_STATUS_DUPLICATE
    bob = await upload(clients["bob"], "bob", updates["bob"], trained)
    assert bob.status == pb.UPLOAD_STATUS_ACCEPTED
    while (await clients["alice"].get_task(WAIT_S)).WhichOneof("task") != "done":
        pass
    final = await clients["alice"].download(1)
    for client in clients.values():
        await client.close()
    return final


@pytest.mark.slow  # four server processes: about a minute here
def test_a_server_killed_before_the_acknowledgement_loses_nothing_acknowledged(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """alice's upload is cut short three times by a kill, each time one step further between
    its last chunk and its acknowledgement, and retried after each restart under the same key:
    it is counted once, and the round's result is the core's aggregate of the two updates."""
    settings = settings_of(tmp_path)
    processes.append(ServerProcess(settings, tmp_path / "0.log", "--stop-at", "check"))
    updates, trained = asyncio.run(round0_updates(processes[-1]))
    run_id, alice = processes[-1].run_id, updates["alice"]

    asyncio.run(killed_mid_commit(processes[-1], "check", alice, trained))
    # All bytes were in, in the draft: not in the spool, not recorded.
    assert recorded_uploads(settings, run_id) == []
    assert [p.suffix for p in drafts(settings, run_id)] == [".part"]
    assert not spool_file(settings, run_id, "alice").exists()

    processes.append(ServerProcess(settings, tmp_path / "1.log", "--stop-at", "publish"))
    assert drafts(settings, run_id) == []  # a restarted server holds no part of an upload
    asyncio.run(killed_mid_commit(processes[-1], "publish", alice, trained))
    # In the spool, whole, but not recorded: not counted (the retry below is taken anew).
    assert recorded_uploads(settings, run_id) == []
    assert spool_file(settings, run_id, "alice").read_bytes() == alice

    processes.append(ServerProcess(settings, tmp_path / "2.log", "--stop-at", "record"))
    asyncio.run(killed_mid_commit(processes[-1], "record", alice, trained))
    # Recorded implies in the spool, whole.
    assert recorded_uploads(settings, run_id) == ["alice"]
    assert spool_file(settings, run_id, "alice").read_bytes() == alice
    assert drafts(settings, run_id) == []

    processes.append(ServerProcess(settings, tmp_path / "3.log"))
    assert processes[-1].run_id == run_id
    final = asyncio.run(finish(processes[-1], updates, trained))
    processes[-1].kill()
    assert recorded_uploads(settings, run_id) == ["alice", "bob"]  # alice's once
    uploads = [("alice", alice, SAMPLES["alice"]), ("bob", updates["bob"], SAMPLES["bob"])]
    assert_same(adapter_of(final), core_aggregate("fedrot", 0, INITIAL, uploads))


@pytest.mark.slow  # two server processes
def test_an_acknowledged_upload_whose_aggregation_a_kill_cut_short_counts_after_the_restart(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """The acknowledgement does not wait for the aggregation: alice's upload is acknowledged
    while the worker has not aggregated it, the server is killed, and the restarted server
    aggregates it from the spool (her retry is a duplicate); the round's result is the core's
    aggregate of both updates."""
    settings = settings_of(tmp_path)
    processes.append(ServerProcess(settings, tmp_path / "0.log", "--stop-at", "aggregate"))
    updates, trained = asyncio.run(round0_updates(processes[-1]))
    run_id, alice = processes[-1].run_id, updates["alice"]

    async def acknowledged_then_killed() -> None:
        client = WireClient(processes[-1].address, token_of("alice"), run_id=run_id)
        reply = await upload(client, "alice", alice, trained)
        assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
        async with asyncio.timeout(WAIT_S):
            assert (await asyncio.to_thread(processes[-1].line)).strip() == "stopped at aggregate"
        processes[-1].kill()
        await client.close()

    asyncio.run(acknowledged_then_killed())
    assert recorded_uploads(settings, run_id) == ["alice"]
    assert spool_file(settings, run_id, "alice").read_bytes() == alice

    processes.append(ServerProcess(settings, tmp_path / "1.log"))
    assert processes[-1].run_id == run_id
    final = asyncio.run(finish(processes[-1], updates, trained))
    processes[-1].kill()
    assert recorded_uploads(settings, run_id) == ["alice", "bob"]
    uploads = [("alice", alice, SAMPLES["alice"]), ("bob", updates["bob"], SAMPLES["bob"])]
    assert_same(adapter_of(final), core_aggregate("fedrot", 0, INITIAL, uploads))


# Refusals leave no file behind; a resumed stream is hashed over its held bytes too.


def test_a_payload_that_does_not_match_its_sha256_leaves_no_file(tmp_path: Path) -> None:
    settings = settings_of(tmp_path)

    async def scenario() -> None:
        async with running_server(settings, INITIAL) as server:
            clients, updates, trained = await enrolled(server.address)
            run_id = server.spec.run_id
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await upload(clients["alice"], "alice", updates["alice"], trained,
                             sha256=hashlib.sha256(b"another payload").hexdigest())  # fmt: skip
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "sha256 mismatch" in (refused.value.details() or "")
            assert drafts(settings, run_id) == []
            assert not spool_file(settings, run_id, "alice").parent.exists()
            assert server.store.uploads(run_id, 0) == []
            assert await held(clients["alice"], updates["alice"]) == 0
            reply = await upload(clients["alice"], "alice", updates["alice"], trained)
            assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
            assert spool_file(settings, run_id, "alice").read_bytes() == updates["alice"]
            assert drafts(settings, run_id) == []
            for client in clients.values():
                await client.close()

    asyncio.run(scenario())


async def held(client: WireClient, payload: bytes, key: str = "key-alice") -> int:
    request = pb.QueryUploadRequest(run_id=client.run_id, round=0, idempotency_key=key,
                                    total_size=len(payload),
                                    sha256=hashlib.sha256(payload).hexdigest())  # fmt: skip
    return (await client.stub.QueryUpload(request, metadata=client.metadata)).bytes_received


async def cut_after(client: WireClient, header: pb.UploadUpdateRequest,
                    chunks: list[pb.UploadUpdateRequest]) -> None:
    """Send ``header`` and ``chunks``, then go silent until the server abandons the stream
    (``upload_stall_s``): it then holds those chunks for a resume."""
    silent = asyncio.Event()

    async def stream() -> AsyncIterator[pb.UploadUpdateRequest]:
        yield header
        for chunk in chunks:
            yield chunk
        await silent.wait()

    try:
        with pytest.raises(grpc.aio.AioRpcError) as stalled:
            await client.stub.UploadUpdate(stream(), metadata=client.metadata)
        assert stalled.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        silent.set()


@pytest.mark.parametrize("held_chunks", [1, 3])
def test_a_resumed_stream_is_hashed_over_the_held_bytes_and_the_new(
    tmp_path: Path, held_chunks: int
) -> None:
    """Cut after ``held_chunks`` chunks of 128 bytes: a resume with another payload's tail (same
    header) is refused as a SHA-256 mismatch and leaves no file; after another cut, the true
    tail, in chunks of another size, completes the upload, whose spool file is the payload."""
    settings = settings_of(tmp_path)

    async def scenario() -> None:
        async with running_server(settings, INITIAL) as server:
            clients, updates, trained = await enrolled(server.address)
            alice, run_id = clients["alice"], server.spec.run_id
            payload, impostor = updates["alice"], updates["bob"]
            assert len(payload) == len(impostor) > (held_chunks + 2) * HELD_CHUNK
            header = upload_header(run_id, 0, payload, trained, sample_count=SAMPLES["alice"],
                                   metrics={}, key="key-alice")  # fmt: skip
            cut = held_chunks * HELD_CHUNK
            held_part = chunk_messages(payload, HELD_CHUNK)[:held_chunks]
            await cut_after(alice, header, held_part)
            assert await held(alice, payload) == cut
            assert len(drafts(settings, run_id)) == 1

            wrong_tail = [pb.UploadUpdateRequest(chunk=pb.Chunk(offset=m.chunk.offset + cut,
                                                                data=m.chunk.data))
                          for m in chunk_messages(impostor[cut:], 300)]  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await alice.upload_messages([header, *wrong_tail])
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "sha256 mismatch" in (refused.value.details() or "")
            assert drafts(settings, run_id) == [] and await held(alice, payload) == 0
            assert not spool_file(settings, run_id, "alice").exists()

            await cut_after(alice, header, held_part)
            assert await held(alice, payload) == cut
            tail = [pb.UploadUpdateRequest(chunk=pb.Chunk(offset=m.chunk.offset + cut,
                                                          data=m.chunk.data))
                    for m in chunk_messages(payload[cut:], 300)]  # fmt: skip
            reply = await alice.upload_messages([header, *tail])
            assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
            assert spool_file(settings, run_id, "alice").read_bytes() == payload
            assert drafts(settings, run_id) == []
            for client in clients.values():
                await client.close()

    asyncio.run(scenario())
