"""A standing server (``--standing``): no run at start, runs submitted to a queue and run one
at a time in submission order, Enroll answering *wait* when no run takes the client,
DeclineRun, stopping a run, and the queue surviving a restart. Fake clients over real gRPC."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.errors import RunSettingsError, WrongStateError
from fedrot_server.service import FederationServer
from fedrot_server.storage.state import RoundPhase, RunPhase
from wire import (
    WireClient,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    trained_of,
    upload_once,
)

CLIENTS = ("alice", "bob")
LORA = {"rank": 2, "alpha": 4.0, "target_modules": ["query", "value"]}


def standing_settings(tmp_path: Path, **overrides: Any):  # noqa: ANN201
    values: dict[str, Any] = {"standing": True, "heartbeat_interval_s": 0.1}
    values.update(overrides)
    return make_settings(tmp_path, CLIENTS, **values)


def run_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"rounds": 1, "min_clients": 2, "lora": LORA, "round_deadline_s": 60.0}
    body.update(overrides)
    return body


async def enroll_in_a_run(client: WireClient, timeout_s: float = 30.0) -> pb.EnrollResponse:
    """Enrol, again after each *wait* (its retry_after), until a run takes the client."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        response = await client.enroll()
        if not response.HasField("wait"):
            return response
        assert loop.time() < end, f"still told to wait: {response.wait.reason}"
        await asyncio.sleep(response.wait.retry_after.ToNanoseconds() / 1e9)


async def train_until_done(client: WireClient, seed: int) -> pb.DoneTask:
    """Train (fake) and upload every round offered until DONE."""
    while True:
        response = await client.get_task(2.0)
        kind = response.WhichOneof("task")
        if kind == "done":
            return response.done
        if kind == "train":
            task = response.train
            update = await client.update_for(task, seed + task.round)
            await client.upload(task.round, update, trained_of(task))


async def wait_until(condition, what: str, timeout_s: float = 30.0) -> None:  # noqa: ANN001
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not condition():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def active_id(server: FederationServer) -> str | None:
    return None if server.runs.active is None else server.runs.active.run_id


def test_enroll_waits_while_no_run_is_active(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(standing_settings(tmp_path), synthetic_adapter()) as server:
            alice = WireClient(server.address, token_of("alice"))
            response = await alice.enroll(host="a")
            assert response.client_id == "alice"
            assert response.HasField("wait") and not response.HasField("run")
            assert "no run is active" in response.wait.reason
            assert response.wait.retry_after.ToNanoseconds() == pytest.approx(0.1e9)
            assert server.store.runs() == []  # a standing server starts no run of its own
            await alice.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_submissions_are_validated(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(standing_settings(tmp_path), synthetic_adapter()) as server:
            with pytest.raises(RunSettingsError) as bad:
                server.runs.submit({"rounds": 0, "lora": {"rank": "x"}})
            assert {name for name, _ in bad.value.problems} == {"rounds", "lora.rank"}
            with pytest.raises(RunSettingsError) as unknown:
                server.runs.submit(run_body(clients=["alice", "mallory"], min_clients=1))
            assert unknown.value.problems[0][0] == "clients" and "mallory" in str(unknown.value)
            assert server.store.runs() == []
        single = make_settings(tmp_path / "single", CLIENTS)
        async with running_server(single, synthetic_adapter()) as server:
            with pytest.raises(WrongStateError, match="--standing"):
                server.runs.submit(run_body())

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_runs_start_in_submission_order_and_stop(tmp_path: Path) -> None:
    """The first submitted run starts; the others queue in order. Stopping a queued run
    cancels it; stopping the active one tells its clients DONE and starts the next."""

    async def scenario() -> None:
        async with running_server(standing_settings(tmp_path), synthetic_adapter()) as server:
            first, second, third = (server.runs.submit(run_body(seed=i)) for i in range(3))
            await wait_until(lambda: active_id(server) == first, "the first run to start")
            assert [r.run_id for r in server.store.queued_runs()] == [second, third]
            assert [(r.run_id, r.queue_position) for r in server.store.runs()] == [
                (first, None), (second, 1), (third, 2)]  # fmt: skip
            assert await server.runs.stop_run(second) is RunPhase.QUEUED
            assert server.store.run(second).phase is RunPhase.STOPPED
            assert server.store.run(third).queue_position == 1

            alice = WireClient(server.address, token_of("alice"))
            assert (await enroll_in_a_run(alice)).run.run_id == first
            await server.runs.stop_run(first)
            done = (await alice.get_task(2.0)).done
            assert done.reason == "the run was stopped" and done.server_continues
            assert done.rounds_completed == 0  # the initial adapter stays downloadable
            payload = await alice.download(0)
            assert hashlib.sha256(payload).hexdigest() == done.final_adapter.sha256
            await wait_until(lambda: active_id(server) == third, "the third run to start")
            assert server.store.run(first).phase is RunPhase.STOPPED
            assert server.store.run(second).rounds_completed == 0
            with pytest.raises(WrongStateError, match="stopped"):
                await server.runs.stop_run(first)
            assert (await enroll_in_a_run(alice)).run.run_id == third
            await alice.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_two_submitted_runs_one_after_another(tmp_path: Path) -> None:
    """Both clients train run one, hear DONE (the server continues), enrol again and train
    run two; run one's final adapter is still served after run two finished."""

    async def scenario() -> None:
        async with running_server(standing_settings(tmp_path), synthetic_adapter()) as server:
            first = server.runs.submit(run_body(rounds=2))
            second = server.runs.submit(run_body(rounds=1, strategy={"name": "fedit"}))
            clients = [WireClient(server.address, token_of(n)) for n in CLIENTS]
            for run_id in (first, second):
                enrolled = await asyncio.gather(*(enroll_in_a_run(c) for c in clients))
                assert {e.run.run_id for e in enrolled} == {run_id}
                dones = await asyncio.gather(*(train_until_done(c, i) for i, c in enumerate(clients)))
                assert all(d.server_continues and d.reason == "the run is finished" for d in dones)
                final = await clients[0].download(dones[0].rounds_completed)
                assert hashlib.sha256(final).hexdigest() == dones[0].final_adapter.sha256
            await wait_until(lambda: server.store.run(second).phase is RunPhase.FINISHED,
                             "the second run to finish")  # fmt: skip
            rows = {r.run_id: r for r in server.store.runs()}
            assert (rows[first].rounds_completed, rows[second].rounds_completed) == (2, 1)
            assert rows[first].phase is RunPhase.FINISHED
            # Run one's clients still hear DONE and get its final adapter, over gRPC...
            bob = clients[1]
            bob.run_id = first
            done = (await bob.get_task(0.5)).done
            assert done.rounds_completed == 2 and done.server_continues
            again = await bob.download(2)
            saved = tmp_path / "state" / "runs" / first / "rounds" / "1" / "adapter"
            assert again == (saved / "adapter_model.safetensors").read_bytes()
            assert hashlib.sha256(again).hexdigest() == done.final_adapter.sha256
            # ... and a client needs no run to be told to wait for the next one.
            assert (await clients[0].enroll()).HasField("wait")
            for client in clients:
                await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_run_takes_only_the_clients_it_names(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(standing_settings(tmp_path), synthetic_adapter()) as server:
            run_id = server.runs.submit(run_body(clients=["alice"], min_clients=1))
            alice, bob = (WireClient(server.address, token_of(n)) for n in CLIENTS)
            assert (await enroll_in_a_run(alice)).run.run_id == run_id
            told = await bob.enroll()
            assert told.HasField("wait") and "does not take client 'bob'" in told.wait.reason
            assert (await train_until_done(alice, 1)).rounds_completed == 1
            assert [c.name for c in server.store.clients(run_id)] == ["alice"]
            for client in (alice, bob):
                await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_declined_run_goes_on_without_the_client(tmp_path: Path) -> None:
    """bob declines while round 0 waits for him: the round closes with alice alone, round 1
    opens with alice and carol (not bob), bob's Enroll answers wait and his reason is kept."""
    settings = make_settings(tmp_path, (*CLIENTS, "carol"), standing=True,
                             heartbeat_interval_s=0.1)  # fmt: skip

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            run_id = server.runs.submit(run_body(rounds=2, min_clients=2))
            alice, bob, carol = (WireClient(server.address, token_of(n))
                                 for n in (*CLIENTS, "carol"))  # fmt: skip
            await asyncio.gather(enroll_in_a_run(alice), enroll_in_a_run(bob))
            task_a = (await alice.get_task(5.0)).train
            assert (await bob.get_task(5.0)).WhichOneof("task") == "train"
            await enroll_in_a_run(carol)  # after round 0 opened: not in it
            reason = "data labels differ at id 1: 'neg' vs 'pos'"
            await bob.stub.DeclineRun(pb.DeclineRunRequest(run_id=run_id, reason=reason),
                                      metadata=bob.metadata)  # fmt: skip
            update = await alice.update_for(task_a, 3)
            await alice.upload(task_a.round, update, trained_of(task_a))
            assert (await alice.get_task(5.0)).train.round == 1  # round 0 closed without bob
            round0, round1 = server.store.rounds(run_id)
            assert round0.phase is RoundPhase.CLOSED and round0.reporters == ("alice",)
            assert round1.participants == ("alice", "carol")
            told = await bob.enroll()
            assert told.HasField("wait") and "declined" in told.wait.reason
            bob.run_id = run_id
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await bob.get_task(0.1)
            assert error.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            (row,) = [c for c in server.store.clients(run_id) if c.name == "bob"]
            assert row.declined == reason
            for client in (alice, bob, carol):
                await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_restart_keeps_the_queue_and_resumes_the_active_run(tmp_path: Path) -> None:
    settings = standing_settings(tmp_path)

    async def first_life() -> tuple[str, str]:
        async with running_server(settings, synthetic_adapter()) as server:
            active = server.runs.submit(run_body(rounds=2, min_clients=1, clients=["alice"]))
            queued = server.runs.submit(run_body(rounds=1, min_clients=1, seed=7))
            alice = WireClient(server.address, token_of("alice"))
            assert (await enroll_in_a_run(alice)).run.run_id == active
            await upload_once(alice, 1)
            await wait_until(lambda: server.store.run(active).rounds_completed == 1,
                             "round 0 to close")  # fmt: skip
            await alice.close()
        return active, queued  # a graceful stop: the active run stays resumable

    async def second_life(active: str, queued: str) -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            assert active_id(server) == active  # resumed, not started over
            assert server.store.run(queued).queue_position == 1
            alice = WireClient(server.address, token_of("alice"))
            response = await enroll_in_a_run(alice)
            assert response.run.run_id == active
            task = (await alice.get_task(5.0)).train
            assert task.round == 1
            await alice.upload(task.round, await alice.update_for(task, 2), trained_of(task))
            assert (await alice.get_task(5.0)).done.rounds_completed == 2
            await wait_until(lambda: active_id(server) == queued, "the queued run to start")
            assert server.store.run(active).phase is RunPhase.FINISHED
            await alice.close()

    active, queued = asyncio.run(asyncio.wait_for(first_life(), 60))
    asyncio.run(asyncio.wait_for(second_life(active, queued), 60))


def test_a_single_run_server_refuses_the_enrolment_of_a_client_that_declined(
    tmp_path: Path,
) -> None:
    """A single-run server has no next run: a declined client's Enroll is FAILED_PRECONDITION
    (the client ends with its one line), never *wait*."""
    settings = make_settings(tmp_path, CLIENTS, heartbeat_interval_s=0.1, min_clients=2)

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            alice, bob = (WireClient(server.address, token_of(n)) for n in CLIENTS)
            enrolled = await bob.enroll()
            assert not enrolled.HasField("wait")
            run_id = enrolled.run.run_id
            await bob.stub.DeclineRun(pb.DeclineRunRequest(run_id=run_id, reason="no fit"),
                                      metadata=bob.metadata)  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await bob.enroll()
            assert error.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "declined" in error.value.details() and "no other run" in error.value.details()
            assert not (await alice.enroll()).HasField("wait")  # the others still join
            for client in (alice, bob):
                await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
