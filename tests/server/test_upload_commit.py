"""The commit of an upload: it finishes even when the client gives up waiting for it, and an
idempotency key names one update only."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.runs.worker import ThreadedWorker
from wire import (
    MIB,
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


async def first_round(server, names: list[str]) -> tuple[list[WireClient], list[pb.TrainTask]]:  # noqa: ANN001
    clients = [WireClient(server.address, token_of(name)) for name in names]
    for client in clients:
        await client.enroll()
    responses = await asyncio.gather(*(client.get_task(10) for client in clients))
    return clients, [response.train for response in responses]


async def two_updates(server, initial):  # noqa: ANN001, ANN201
    """alice's and bob's clients, round 0's tasks and an update each (10 samples each)."""
    clients, tasks = await first_round(server, ["alice", "bob"])
    updates = [encode_update(local_update(initial, trained_of(t), seed=i))
               for i, t in enumerate(tasks)]  # fmt: skip
    return clients, tasks, updates


async def check_published_round0(alice: WireClient, initial, updates: list[bytes]) -> None:  # noqa: ANN001
    """Round 1 is open and round 0's adapter is the core's aggregate of both updates."""
    assert (await alice.get_task(10)).train.round == 1
    published = adapter_of(await alice.download(1))
    expected = core_aggregate("fedrot", 0, initial,
                              [("alice", updates[0], 10), ("bob", updates[1], 10)])  # fmt: skip
    assert_same(published, expected)


def test_a_commit_the_client_stops_waiting_for_still_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's deadline passes while the server checks its update: the update is still
    recorded and counted, the retry is answered DUPLICATE, and the round's aggregate is the
    core's over the recorded uploads."""
    check = ThreadedWorker._check

    def slow_check(self, payload, trained):  # noqa: ANN001, ANN202 - a large adapter
        time.sleep(0.8)
        return check(self, payload, trained)

    monkeypatch.setattr(ThreadedWorker, "_check", slow_check)
    initial = synthetic_adapter()
    settings = make_settings(tmp_path, ["alice", "bob"], rounds=2)

    async def scenario() -> None:
        async with running_server(settings, initial) as server:
            (alice, bob), (task_a, task_b), updates = await two_updates(server, initial)
            header = upload_header(alice.run_id, 0, updates[0], trained_of(task_a),
                                   sample_count=10, metrics={}, key="alice-0")  # fmt: skip
            messages = [header, *chunk_messages(updates[0], MIB)]

            async def stream():  # noqa: ANN202
                for message in messages:
                    yield message

            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await alice.stub.UploadUpdate(stream(), metadata=alice.metadata, timeout=0.3)
            assert cut.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(100):
                if server.store.uploads(alice.run_id, 0):
                    break
                await asyncio.sleep(0.1)
            assert [u.client for u in server.store.uploads(alice.run_id, 0)] == ["alice"]
            retry = await alice.upload(0, updates[0], trained_of(task_a), key="alice-0")
            assert retry.status == pb.UPLOAD_STATUS_DUPLICATE
            accepted = await bob.upload(0, updates[1], trained_of(task_b), key="bob-0")
            assert accepted.status == pb.UPLOAD_STATUS_ACCEPTED
            await check_published_round0(alice, initial, updates)
            for client in (alice, bob):
                await client.close()

    asyncio.run(scenario())


def test_an_idempotency_key_names_one_update(tmp_path: Path) -> None:
    initial = synthetic_adapter()
    settings = make_settings(tmp_path, ["alice"], rounds=2, min_clients=1)

    async def scenario() -> None:
        async with running_server(settings, initial) as server:
            (alice,), (task,) = await first_round(server, ["alice"])
            update = encode_update(local_update(initial, trained_of(task), seed=1))
            first = await alice.upload(0, update, trained_of(task), key="reused")
            assert first.status == pb.UPLOAD_STATUS_ACCEPTED
            task = (await alice.get_task(10)).train
            other = encode_update(local_update(initial, trained_of(task), seed=2))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await alice.upload(1, other, trained_of(task), key="reused")
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "'reused' was used for another update" in (refused.value.details() or "")
            assert server.store.uploads(alice.run_id, 1) == []
            replay = await alice.upload(0, update, trained_of(task), key="reused")
            assert replay.status == pb.UPLOAD_STATUS_DUPLICATE
            await alice.close()

    asyncio.run(scenario())


def test_a_client_revoked_during_its_upload_is_refused_at_the_commit(tmp_path: Path) -> None:
    """Sole participant, so the revocation keeps the round waiting for it: the upload that was
    streaming is refused (PERMISSION_DENIED) and nothing is recorded."""
    initial = synthetic_adapter()
    settings = make_settings(tmp_path, ["alice", "bob"], rounds=1, min_clients=1,
                             clients_per_round=1)  # fmt: skip

    async def scenario() -> None:
        async with running_server(settings, initial) as server:
            (alice,), (task,) = await first_round(server, ["alice"])
            update = encode_update(local_update(initial, trained_of(task), seed=1))
            header = upload_header(alice.run_id, 0, update, trained_of(task), sample_count=10,
                                   metrics={})  # fmt: skip
            chunks = chunk_messages(update, 256)
            gate = asyncio.Event()

            async def stream():  # noqa: ANN202
                yield header
                yield chunks[0]
                await gate.wait()
                for chunk in chunks[1:]:
                    yield chunk

            call = alice.stub.UploadUpdate(stream(), metadata=alice.metadata)
            await asyncio.sleep(0.3)
            await server.engine.revoke("alice")
            gate.set()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert server.store.uploads(alice.run_id, 0) == []
            await alice.close()

    asyncio.run(scenario())


def test_an_aggregation_that_fails_after_the_acknowledgement_is_rebuilt_from_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker aggregates an acknowledged upload after the acknowledgement; if that fails
    (no bad upload gets that far: an out-of-memory, say), the round's aggregate is rebuilt
    from its recorded uploads before it closes, and nothing acknowledged is lost."""
    add_checked = ThreadedWorker._add_checked
    failures = []

    def fails_once(self, client_id, update, weight):  # noqa: ANN001, ANN202
        if not failures:
            failures.append(client_id)
            raise RuntimeError("out of memory (simulated)")
        return add_checked(self, client_id, update, weight)

    monkeypatch.setattr(ThreadedWorker, "_add_checked", fails_once)
    initial = synthetic_adapter()
    settings = make_settings(tmp_path, ["alice", "bob"], rounds=2)

    async def scenario() -> None:
        async with running_server(settings, initial) as server:
            (alice, bob), (task_a, task_b), updates = await two_updates(server, initial)
            first = await alice.upload(0, updates[0], trained_of(task_a), key="alice-0")
            assert first.status == pb.UPLOAD_STATUS_ACCEPTED
            second = await bob.upload(0, updates[1], trained_of(task_b), key="bob-0")
            assert second.status == pb.UPLOAD_STATUS_ACCEPTED
            await check_published_round0(alice, initial, updates)
            for client in (alice, bob):
                await client.close()

    with caplog.at_level("ERROR", logger="fedrot_server.runs.ledger"):
        asyncio.run(scenario())
    assert failures and "rebuilding the round's aggregate" in caplog.text
