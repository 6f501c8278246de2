"""The round engine without any transport: sampling, tasks, uploads, closing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fedrot.adapters import BOTH_FACTORS
from fedrot.strategies import StrategyConfig, build_strategy
from fedrot_server.storage.artifacts import RunArtifacts
from fedrot_server.errors import NotFoundError, UploadInProgressError, WrongStateError
from fedrot_server.runs.participants import Roster, sample_participants
from fedrot_server.runs.rounds import RoundEngine
from fedrot_server.runs.spec import InitialModel, RunSpec
from fedrot_server.storage.state import RunPhase
from fedrot_server.storage.store import SqliteStore
from fedrot_server.runs.tasks import DoneTask, TrainTask, UploadOutcome, UploadRequest, WaitTask
from fedrot_server.rpc.transfers import sha256_hex
from fedrot_server.runs.worker import ThreadedWorker
from wire import encode_update, local_update, make_settings, synthetic_adapter


def test_sampling_is_seeded_and_bounded() -> None:
    pool = [f"c{i}" for i in range(10)]
    first = sample_participants(pool, 4, seed=1, round_index=3)
    assert first == sample_participants(reversed(pool), 4, seed=1, round_index=3)
    assert len(set(first)) == 4 and set(first) <= set(pool)
    others = {tuple(sample_participants(pool, 4, seed=1, round_index=t)) for t in range(8)}
    assert len(others) > 1
    assert sample_participants(pool[:3], 4, seed=1, round_index=0) == pool[:3]


def test_roster_liveness_and_holds() -> None:
    roster = Roster()
    roster.touch("a", now=0.0)
    roster.touch("b", now=5.0)
    assert roster.live(now=6.0, timeout_s=2.0) == ["b"]
    roster.hold("a")
    assert roster.live(now=6.0, timeout_s=2.0) == ["a", "b"]
    roster.release("a")
    assert roster.live(now=6.0, timeout_s=2.0) == ["b"]
    assert "a" in roster and "z" not in roster and len(roster) == 2


def make_engine(
    tmp_path: Path, clients: list[str], **overrides: object
) -> tuple[RoundEngine, ThreadedWorker, SqliteStore]:
    settings = make_settings(tmp_path, clients, rounds=1, max_task_wait_s=1.0, **overrides)
    spec = RunSpec.from_settings(settings, "run-test")
    initial = InitialModel(synthetic_adapter(), "")
    strategy = build_strategy("fedit", StrategyConfig())
    store = SqliteStore(settings.database_path)
    store.sync_client_tokens(settings.client_tokens())
    worker = ThreadedWorker(strategy, initial.schema)
    artifacts = RunArtifacts(settings.state_dir, spec.run_id, {"r": 2})
    engine = RoundEngine(settings, spec, store=store, worker=worker, strategy=strategy,
                         initial=initial, artifacts=artifacts)  # fmt: skip
    return engine, worker, store


def request(payload: bytes, **fields: object) -> UploadRequest:
    values: dict = {"run_id": "run-test", "round_index": 0, "sample_count": 4,
                    "total_size": len(payload), "sha256": sha256_hex(payload),
                    "idempotency_key": "key-1", "factors": BOTH_FACTORS, **fields}  # fmt: skip
    return UploadRequest(**values)


def test_engine_drives_a_round_without_a_transport(tmp_path: Path) -> None:
    engine, worker, store = make_engine(tmp_path, ["alice", "bob"], min_clients=1, clients_per_round=1)

    async def scenario() -> None:
        try:
            await drive(engine)
        finally:
            await engine.stop()
            await worker.close()
            store.close()

    asyncio.run(scenario())


async def drive(engine: RoundEngine) -> None:
    await engine.start()
    with pytest.raises(NotFoundError):
        await engine.next_task("alice", "run-test", 0)
    engine.enroll("alice", {})
    task = await engine.next_task("alice", "run-test", 5.0)
    assert isinstance(task, TrainTask) and task.round_index == 0
    assert task.trained == BOTH_FACTORS and task.adapter.round_index == 0
    engine.enroll("bob", {})
    assert isinstance(await engine.next_task("bob", "run-test", 0), WaitTask)
    with pytest.raises(WrongStateError, match="not a participant"):
        await engine.open_upload("bob", request(b"x"))
    engine.heartbeat("alice", "run-test", 0, "training", 0.5)
    assert engine.status().progress["alice"].fraction == 0.5
    payload = encode_update(local_update(engine.reference, BOTH_FACTORS, seed=1))
    # A first attempt whose stream broke: a retry waits for it to end, then takes over.
    broken = await engine.open_upload("alice", request(payload))
    retry = asyncio.ensure_future(engine.open_upload("alice", request(payload)))
    await asyncio.sleep(0)  # let the retry reach the busy slot (it waits on an event)
    assert not retry.done()
    engine.release(broken)
    ticket = await retry
    # A third attempt while the retry streams: answered as a replay once the retry commits.
    replay = asyncio.ensure_future(engine.open_upload("alice", request(payload)))
    try:
        ticket.receiver.add(0, payload)
        outcome = await engine.commit_upload(ticket, await ticket.receiver.finish())
    finally:
        engine.release(ticket)
    assert outcome == UploadOutcome(False, len(payload), "run-test/0/alice")
    assert (await replay).duplicate
    assert (await engine.open_upload("alice", request(payload))).duplicate
    await engine.wait_finished()
    assert engine.phase is RunPhase.FINISHED
    assert engine.status().progress == {}  # a closed round's heartbeats are dropped
    done = await engine.next_task("bob", "run-test", 0)
    assert isinstance(done, DoneTask) and done.rounds_completed == 1
    assert engine.adapter_for("bob", "run-test", 1).sha256 == done.final_adapter.sha256
    with pytest.raises(WrongStateError, match="round 0 is over"):
        engine.adapter_for("bob", "run-test", 0)
    assert not await engine.wait_all_told(0.0)  # alice was not told yet
    await engine.next_task("alice", "run-test", 0)
    assert await engine.wait_all_told(0.0)


def test_a_stuck_upload_makes_a_second_one_abort(tmp_path: Path) -> None:
    engine, worker, store = make_engine(tmp_path, ["alice"], min_clients=1, upload_takeover_s=0.01)

    async def scenario() -> None:
        try:
            await engine.start()
            engine.enroll("alice", {})
            assert isinstance(await engine.next_task("alice", "run-test", 5.0), TrainTask)
            payload = encode_update(local_update(engine.reference, BOTH_FACTORS, seed=1))
            stuck = await engine.open_upload("alice", request(payload))
            with pytest.raises(UploadInProgressError):
                await engine.open_upload("alice", request(payload))
            engine.release(stuck)
        finally:
            await engine.stop()
            await worker.close()
            store.close()

    asyncio.run(scenario())
