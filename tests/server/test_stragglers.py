"""Stragglers and partial participation: a round closes at its deadline once a quorum
reported; a late update is refused (``late_updates = "drop"``) or aligned to the current
reference and added with a staleness weight (``"stale"``); ``clients_per_round`` samples a
fraction of the clients each round."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from fedrot.adapters import Adapter
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.runs.participants import sample_participants
from wire import (
    WireClient,
    adapter_of,
    assert_same,
    core_aggregate,
    encode_update,
    local_update,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    trained_of,
)

NAMES = ("alice", "bob", "carol")


async def next_train(client: WireClient) -> pb.TrainTask:
    while True:
        response = await client.get_task(max_wait_s=2.0)
        assert response.WhichOneof("task") != "done", response
        if response.WhichOneof("task") == "train":
            return response.train


async def trained_update(client: WireClient, seed: int) -> tuple[pb.TrainTask, bytes, Adapter]:
    task = await next_train(client)
    reference = adapter_of(await client.download(task.round))
    return task, encode_update(local_update(reference, trained_of(task), seed=seed)), reference


async def straggle(server, policy: str) -> dict[str, object]:  # noqa: ANN001
    """Round 0 closes at its deadline with alice and bob; carol's round-0 update arrives in
    round 1, before anyone else's; then alice and bob send round 1."""
    clients = {n: WireClient(server.address, token_of(n)) for n in NAMES}
    await asyncio.gather(*(c.enroll() for c in clients.values()))
    late_task, late_update, _ = await trained_update(clients["carol"], seed=30)
    for seed, name in enumerate(("alice", "bob")):
        task, update, _ = await trained_update(clients[name], seed=seed)
        assert (await clients[name].upload(task.round, update, trained_of(task))).status == \
            pb.UPLOAD_STATUS_ACCEPTED  # fmt: skip
    task1, update_a, reference1 = await trained_update(clients["alice"], seed=11)  # round 1 open
    assert task1.round == 1
    seen = {"heartbeat_open": (await clients["carol"].heartbeat(0)).round_open,
            "reference1": reference1, "late": late_update}  # fmt: skip
    try:
        reply = await clients["carol"].upload(0, late_update, trained_of(late_task), key="late-0")
        seen["late_status"] = reply.status
        again = await clients["carol"].upload(0, late_update, trained_of(late_task), key="late-0")
        seen["replay_status"] = again.status
    except grpc.aio.AioRpcError as error:
        seen["late_error"] = (error.code(), error.details())
    task_b, update_b, _ = await trained_update(clients["bob"], seed=12)
    seen["uploads"] = [("alice", update_a), ("bob", update_b)]
    for name, update in seen["uploads"]:
        assert (await clients[name].upload(1, update, trained_of(task1))).status == \
            pb.UPLOAD_STATUS_ACCEPTED  # fmt: skip
    done = await clients["alice"].get_task(max_wait_s=30.0)
    while done.WhichOneof("task") != "done":
        done = await clients["alice"].get_task(max_wait_s=30.0)
    seen["final"] = adapter_of(await clients["alice"].download(2))
    for client in clients.values():
        await client.close()
    return seen


def run_straggling(tmp_path: Path, policy: str) -> dict[str, object]:
    settings = make_settings(tmp_path, NAMES, quorum=2, round_deadline_s=0.5,
                             late_updates=policy, staleness_weight=0.25)  # fmt: skip

    async def scenario() -> dict[str, object]:
        async with running_server(settings, synthetic_adapter()) as server:
            seen = await asyncio.wait_for(straggle(server, policy), 60)
            seen["rows"] = server.store.merged_uploads(server.spec.run_id, 1)
            return seen

    return asyncio.run(scenario())


def test_a_stale_update_is_aligned_and_added_with_its_staleness_weight(tmp_path: Path) -> None:
    seen = run_straggling(tmp_path, "stale")
    assert seen["heartbeat_open"] is True
    assert seen["late_status"] == pb.UPLOAD_STATUS_ACCEPTED
    assert seen["replay_status"] == pb.UPLOAD_STATUS_DUPLICATE
    rows = seen["rows"]
    assert [(r.client, r.round_index, r.merged_into) for r in rows] == [
        ("carol", 0, 1), ("alice", 1, None), ("bob", 1, None)]  # fmt: skip
    uploads = [("carol", seen["late"], 10 * 0.25)]  # one round late: weight n * 0.25 ** 1
    uploads += [(name, update, 10) for name, update in seen["uploads"]]
    assert_same(seen["final"], core_aggregate("fedrot", 1, seen["reference1"], uploads))


def test_a_late_update_is_dropped_naming_its_round(tmp_path: Path) -> None:
    seen = run_straggling(tmp_path, "drop")
    assert seen["heartbeat_open"] is False
    code, details = seen["late_error"]
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "round 0 does not accept updates" in details
    assert [r.client for r in seen["rows"]] == ["alice", "bob"]
    uploads = [(name, update, 10) for name, update in seen["uploads"]]
    assert_same(seen["final"], core_aggregate("fedrot", 1, seen["reference1"], uploads))


@pytest.mark.parametrize("portion", [2, 0.5])
def test_partial_participation_samples_clients_per_round(tmp_path: Path, portion) -> None:  # noqa: ANN001
    names = ["alice", "bob", "carol", "dave"]
    settings = make_settings(tmp_path, names, clients_per_round=portion, rounds=2)

    async def participate(client: WireClient) -> int:
        trained = 0
        while True:
            response = await client.get_task(max_wait_s=2.0)
            if response.WhichOneof("task") == "done":
                return trained
            if response.WhichOneof("task") == "train":
                task = response.train
                reference = adapter_of(await client.download(task.round))
                update = encode_update(local_update(reference, trained_of(task), seed=trained))
                await client.upload(task.round, update, trained_of(task))
                trained += 1

    async def scenario():  # noqa: ANN202
        async with running_server(settings, synthetic_adapter()) as server:
            clients = [WireClient(server.address, token_of(n)) for n in names]
            await asyncio.gather(*(c.enroll() for c in clients))
            counts = await asyncio.wait_for(asyncio.gather(*(participate(c) for c in clients)), 60)
            for client in clients:
                await client.close()
            return counts, server.store.rounds(server.spec.run_id)

    counts, rounds = asyncio.run(scenario())
    assert sum(counts) == 4  # 2 of 4 clients in each of 2 rounds
    for row in rounds:
        expected = sample_participants(names, 2, seed=0, round_index=row.round_index)
        assert list(row.participants) == expected == sorted(row.reporters)
