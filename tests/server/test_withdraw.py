"""A participant that cannot send its update withdraws (Heartbeat phase WITHDRAWN): the round
stops waiting for it, a round left without it replaces it at the deadline, and an upload of it
for that round is refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from fedrot_proto.v1 import federation_pb2 as pb
from wire import (
    WireClient,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    trained_of,
)


async def train_and_upload(client: WireClient, task: pb.TrainTask, seed: int) -> int:
    update = await client.update_for(task, seed)
    return (await client.upload(task.round, update, trained_of(task))).status


def test_a_withdrawn_participant_is_not_waited_for(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice", "bob"], rounds=2, round_deadline_s=600.0)

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            alice, bob = (WireClient(server.address, token_of(n)) for n in ("alice", "bob"))
            await asyncio.gather(alice.enroll(), bob.enroll())
            task_a, task_b = [(await c.get_task(10)).train for c in (alice, bob)]
            assert await train_and_upload(alice, task_a, 1) == pb.UPLOAD_STATUS_ACCEPTED
            reply = await bob.heartbeat(task_b.round, pb.CLIENT_PHASE_WITHDRAWN)
            assert not reply.round_open
            next_task = (await alice.get_task(10)).train  # round 0 closed without bob, at once
            assert next_task.round == 1
            (round0, *_) = server.store.rounds(server.spec.run_id)
            assert round0.reporters == ("alice",)
            for client in (alice, bob):
                await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_sole_participant_that_withdraws_is_replaced_at_the_deadline(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice", "bob"], rounds=1, clients_per_round=1,
                             round_deadline_s=1.0)  # fmt: skip

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            clients = {n: WireClient(server.address, token_of(n)) for n in ("alice", "bob")}
            await asyncio.gather(*(c.enroll() for c in clients.values()))
            responses = await asyncio.gather(*(c.get_task(2.0) for c in clients.values()))
            chosen = next(n for n, r in zip(clients, responses, strict=True)
                          if r.WhichOneof("task") == "train")  # fmt: skip
            other = next(n for n in clients if n != chosen)
            await clients[chosen].heartbeat(0, pb.CLIENT_PHASE_WITHDRAWN)
            assert (await clients[chosen].get_task(0.5)).WhichOneof("task") != "train"
            while (response := await clients[other].get_task(2.0)).WhichOneof("task") != "train":
                pass  # the deadline passes; the withdrawn participant is replaced
            assert await train_and_upload(clients[other], response.train, 2) == \
                pb.UPLOAD_STATUS_ACCEPTED  # fmt: skip
            (round0,) = server.store.rounds(server.spec.run_id)
            for _ in range(100):
                (round0,) = server.store.rounds(server.spec.run_id)
                if round0.phase.value == "closed":
                    break
                await asyncio.sleep(0.05)
            assert round0.reporters == (other,)
            for client in clients.values():
                await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_withdrawn_participant_can_no_longer_upload_for_that_round(tmp_path: Path) -> None:
    """The withdrawal stands: the round may already be re-planned without the client (it closes
    without it, or replaces it), so its update is FAILED_PRECONDITION and never counted."""
    names = ("alice", "bob", "carol")
    settings = make_settings(tmp_path, list(names), rounds=1, round_deadline_s=600.0)

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            alice, bob, carol = (WireClient(server.address, token_of(n)) for n in names)
            await asyncio.gather(alice.enroll(), bob.enroll(), carol.enroll())
            tasks = [(await c.get_task(10)).train for c in (alice, bob, carol)]
            update = await bob.update_for(tasks[1], 2)
            await bob.heartbeat(0, pb.CLIENT_PHASE_WITHDRAWN)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await bob.upload(0, update, trained_of(tasks[1]))
            assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "client 'bob' withdrew from round 0" in refused.value.details()
            assert server.store.uploads(server.spec.run_id, 0) == []
            assert not (await bob.heartbeat(0)).round_open
            for client, task, seed in ((alice, tasks[0], 1), (carol, tasks[2], 3)):
                assert await train_and_upload(client, task, seed) == pb.UPLOAD_STATUS_ACCEPTED
            assert (await alice.get_task(10)).WhichOneof("task") == "done"
            (round0,) = server.store.rounds(server.spec.run_id)
            assert round0.reporters == ("alice", "carol")
            for client in (alice, bob, carol):
                await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
