"""A client that never uploads does not stall the run: the deadline closes the round with a
quorum, or (without one) extends it and replaces the silent participant."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fedrot_proto.v1 import federation_pb2 as pb
from wire import (
    WireClient,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    trained_of,
)


async def participate(client: WireClient, silent: list[str]) -> str:
    """Train and upload every task, except that the first client to get one goes silent.

    Returns ``"done"``, or ``"silent"`` for the client that stopped talking.
    """
    while True:
        response = await client.get_task(max_wait_s=2.0)
        kind = response.WhichOneof("task")
        if kind == "done":
            return "done"
        if kind == "wait":
            continue
        if not silent:
            silent.append(client.token or "")
            return "silent"
        task = response.train
        update = await client.update_for(task, seed=len(client.token or ""))
        result = await client.upload(task.round, update, trained_of(task))
        assert result.status == pb.UPLOAD_STATUS_ACCEPTED


def run_federation(tmp_path: Path, names: list[str], **overrides: object):  # noqa: ANN201
    settings = make_settings(tmp_path, names, rounds=1, **overrides)

    async def scenario():  # noqa: ANN202
        silent: list[str] = []
        async with running_server(settings, synthetic_adapter()) as server:
            clients = [WireClient(server.address, token_of(n)) for n in names]
            await asyncio.gather(*(c.enroll() for c in clients))
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(participate(c, silent) for c in clients)), 60
            )
            rows = server.store.rounds(server.spec.run_id)
            for client in clients:
                await client.close()
            return outcomes, silent, rows

    return asyncio.run(scenario())


def test_deadline_closes_the_round_with_a_quorum(tmp_path: Path) -> None:
    names = ["alice", "bob", "carol"]
    outcomes, silent, rows = run_federation(tmp_path, names, quorum=2, round_deadline_s=0.5)
    assert sorted(outcomes) == ["done", "done", "silent"]
    (row,) = rows
    silent_name = next(n for n in names if token_of(n) == silent[0])
    assert sorted(row.participants) == names
    assert sorted(row.reporters) == sorted(set(names) - {silent_name})
    assert row.summary["extensions"] == 0


def test_deadline_without_quorum_extends_and_replaces_the_silent_client(tmp_path: Path) -> None:
    names = ["alice", "bob", "carol", "dave"]
    outcomes, silent, rows = run_federation(
        tmp_path, names, clients_per_round=3, quorum=3, round_deadline_s=0.5, client_timeout_s=0.2
    )
    assert sorted(outcomes) == ["done", "done", "done", "silent"]
    (row,) = rows
    silent_name = next(n for n in names if token_of(n) == silent[0])
    assert row.summary["extensions"] >= 1
    assert sorted(row.participants) == names  # the spare joined the round
    assert sorted(row.reporters) == sorted(set(names) - {silent_name})
