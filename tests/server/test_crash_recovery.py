"""A server killed with SIGKILL in the middle of a round (an aligned one) resumes it on
restart: same run, same round, same participants, same reference; the uploads accepted before the crash are not asked for again, a
replayed one is acknowledged as a duplicate and counted once, and the round's aggregate equals
that of a run without the crash (same uploads, same order)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fedrot.adapters import Adapter
from fedrot.codec import ADAPTER_WEIGHTS_FILE
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.errors import SettingsError, StoreError
from fedrot_server.runs.ledger import RoundLedger
from fedrot_server.runs.run_manager import RunManager
from fedrot_server.service import start_server
from fedrot_server.settings import ServerSettings
from fedrot_server.storage.state import RunPhase
from fedrot_server.storage.store import open_reader
from server_process import ServerProcess
from wire import (
    WireClient,
    adapter_of,
    assert_same,
    core_aggregate,
    encode_update,
    initializer_of,
    local_update,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    trained_of,
)

NAMES = ("alice", "bob", "carol")
SAMPLES = {"alice": 10, "bob": 30, "carol": 17}


def settings_for(tmp_path: Path, **overrides: object) -> ServerSettings:
    return make_settings(tmp_path, NAMES, rounds=2, max_task_wait_s=2.0, linger_s=0.0,
                         final_download_grace_s=60.0, **overrides)  # fmt: skip


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.kill()


def update_of(name: str, task: pb.TrainTask, reference: Adapter) -> bytes:
    seed = 1000 * task.round + NAMES.index(name)
    return encode_update(local_update(reference, trained_of(task), seed=seed))


async def train_task(client: WireClient) -> pb.TrainTask:
    while True:
        response = await client.get_task(max_wait_s=2.0)
        assert response.WhichOneof("task") != "done", response
        if response.WhichOneof("task") == "train":
            return response.train


async def train_and_upload(client: WireClient, name: str, key: str) -> tuple[bytes, pb.TrainTask]:
    task = await train_task(client)
    update = update_of(name, task, adapter_of(await client.download(task.round)))
    reply = await client.upload(task.round, update, trained_of(task), key=key,
                                sample_count=SAMPLES[name])  # fmt: skip
    assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
    return update, task


async def before_the_crash(address: str) -> tuple[dict[tuple[int, str], bytes], frozenset]:
    """Everyone enrols and sends round 0; in round 1 (which aligns A) alice and bob send theirs,
    carol has not yet. Returns the uploads by (round, client) and round 1's trained factors."""
    clients = {n: WireClient(address, token_of(n)) for n in NAMES}
    await asyncio.gather(*(c.enroll() for c in clients.values()))
    sent = {}
    for round_index, names in ((0, NAMES), (1, ("alice", "bob"))):
        for name in names:
            update, task = await train_and_upload(clients[name], name,
                                                  key=f"key-{name}-{round_index}")  # fmt: skip
            assert task.round == round_index
            sent[(round_index, name)] = update
    for client in clients.values():
        await client.close()
    return sent, trained_of(task)


async def after_the_restart(
    address: str, run_id: str, sent: dict[tuple[int, str], bytes], trained: frozenset
) -> bytes:
    """A replay of alice's round-1 upload is a duplicate; alice is not asked to train round 1
    again; carol sends round 1, the last; returns the encoded final adapter."""
    clients = {n: WireClient(address, token_of(n), run_id=run_id) for n in NAMES}
    replay = await clients["alice"].upload(1, sent[(1, "alice")], trained,
                                           key="key-alice-1", sample_count=SAMPLES["alice"])
    assert replay.status == pb.UPLOAD_STATUS_DUPLICATE
    waiting = await clients["alice"].get_task(max_wait_s=0.0)
    assert waiting.WhichOneof("task") == "wait", waiting
    sent[(1, "carol")], task = await train_and_upload(clients["carol"], "carol",
                                                      key="key-carol-1")  # fmt: skip
    assert task.round == 1
    while (await clients["bob"].get_task()).WhichOneof("task") != "done":
        pass
    result = await clients["bob"].download(2)
    for client in clients.values():
        await client.close()
    return result


def uncrashed_result(tmp_path: Path, sent: dict[tuple[int, str], bytes]) -> bytes:
    """The same uploads in the same order to a server that never crashes: its final adapter."""
    settings = settings_for(tmp_path / "uncrashed")

    async def scenario() -> bytes:
        async with running_server(settings, synthetic_adapter()) as server:
            clients = {n: WireClient(server.address, token_of(n)) for n in NAMES}
            await asyncio.gather(*(c.enroll() for c in clients.values()))
            for round_index in (0, 1):
                for name in NAMES:
                    task = await train_task(clients[name])
                    assert task.round == round_index
                    reply = await clients[name].upload(round_index, sent[(round_index, name)],
                                                       trained_of(task),
                                                       sample_count=SAMPLES[name])  # fmt: skip
                    assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
            while (await clients["alice"].get_task()).WhichOneof("task") != "done":
                pass
            payload = await clients["alice"].download(2)
            for client in clients.values():
                await client.close()
            return payload

    return asyncio.run(scenario())


def refused_and_fresh_starts(settings: ServerSettings, run_id: str, scratch: Path) -> None:
    """While the crashed run waits: changed defining settings (or the intake's) are refused;
    resume = false starts a new run (on a copy of the state, which then holds the newer run to
    resume)."""
    changed = settings.model_copy(update={"strategy": settings.strategy.model_copy(
        update={"alignment_strength": 0.9})})  # fmt: skip
    with pytest.raises(SettingsError, match=rf"{run_id}.*strategy\.alignment_strength was 0\.4"):
        asyncio.run(start_server(changed, initializer=initializer_of(synthetic_adapter())))
    stricter = settings.model_copy(update={"max_upload_value": 10.0})
    with pytest.raises(SettingsError, match=r"intake\.max_upload_value was 10000\.0"):
        asyncio.run(start_server(stricter, initializer=initializer_of(synthetic_adapter())))
    shutil.copytree(settings.state_dir, scratch)

    async def fresh() -> str:
        server = await start_server(settings.model_copy(update={"resume": False,
                                                                "state_dir": scratch}),
                                    initializer=initializer_of(synthetic_adapter()))  # fmt: skip
        await server.stop(grace_s=0.1)
        return server.spec.run_id

    assert asyncio.run(fresh()) != run_id


def test_a_killed_server_resumes_its_round(tmp_path: Path, processes: list) -> None:
    settings = settings_for(tmp_path)
    processes.append(ServerProcess(settings, tmp_path / "first.log"))
    first = processes[-1]
    sent, trained = asyncio.run(before_the_crash(first.address))
    first.kill()
    refused_and_fresh_starts(settings, first.run_id, tmp_path / "copy")

    processes.append(ServerProcess(settings, tmp_path / "second.log"))
    second = processes[-1]
    assert second.run_id == first.run_id
    resumed = asyncio.run(after_the_restart(second.address, second.run_id, sent, trained))
    second.kill()

    reader = open_reader(settings.database_path)
    try:
        rows = reader.uploads(first.run_id, 1)
        assert [u.client for u in rows] == ["alice", "bob", "carol"]  # the replay counted once
        assert [r.run_id for r in reader.runs()] == [first.run_id]
        assert reader.run(first.run_id).phase is RunPhase.FINISHED
        (_, round1) = reader.rounds(first.run_id)
        assert sorted(round1.reporters) == list(NAMES) and round1.summary["aligned"] == "A"
    finally:
        reader.close()
    saved = settings.state_dir / "runs" / first.run_id / "rounds" / "1" / "adapter"
    assert (saved / ADAPTER_WEIGHTS_FILE).read_bytes() == resumed
    assert_same(adapter_of(resumed), adapter_of(uncrashed_result(tmp_path, sent)))


class HeldRefeed:
    """Holds the restarted server's re-feed of the open round until the test lets it go (or
    cancels it); ``entered`` is set once the re-feed began, ``managers`` are the started
    servers' run managers (what the dashboard's stop button calls)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = asyncio.Event()
        self.released = asyncio.Event()
        self.managers: list[RunManager] = []
        refeed, start = RoundLedger.refeed, RunManager.start
        held = self

        async def held_refeed(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            held.entered.set()
            await held.released.wait()
            return await refeed(self, *args, **kwargs)

        async def remembered_start(self) -> None:  # noqa: ANN001
            held.managers.append(self)
            await start(self)

        monkeypatch.setattr(RoundLedger, "refeed", held_refeed)
        monkeypatch.setattr(RunManager, "start", remembered_start)


def test_a_server_shut_down_during_the_refeed_resumes_the_round_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown (the start cancelled) while the restarted server re-feeds the open round
    leaves the run resumable with nothing lost: the next start re-feeds alice's and bob's
    uploads, carol's finishes the round, and the result equals that of a server that never
    stopped."""
    settings = settings_for(tmp_path)

    async def first_life() -> tuple[dict[tuple[int, str], bytes], frozenset]:
        async with running_server(settings, synthetic_adapter()) as server:
            return await before_the_crash(server.address)

    sent, trained = asyncio.run(first_life())
    held = HeldRefeed(monkeypatch)

    async def cut_short() -> None:
        starting = asyncio.create_task(
            start_server(settings, initializer=initializer_of(synthetic_adapter())))
        await asyncio.wait_for(held.entered.wait(), timeout=30)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting

    asyncio.run(cut_short())
    held.released.set()  # the third life re-feeds at once (the state folder is free again)

    async def third_life() -> tuple[str, bytes]:
        async with running_server(settings, synthetic_adapter()) as server:
            run_id = server.spec.run_id
            return run_id, await after_the_restart(server.address, run_id, sent, trained)

    run_id, resumed = asyncio.run(third_life())
    reader = open_reader(settings.database_path)
    try:
        assert [u.client for u in reader.uploads(run_id, 1)] == ["alice", "bob", "carol"]
        assert reader.run(run_id).phase is RunPhase.FINISHED
    finally:
        reader.close()
    assert_same(adapter_of(resumed), adapter_of(uncrashed_result(tmp_path, sent)))


def test_an_operator_stop_during_the_refeed_ends_the_run_with_its_uploads_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dashboard serves while the restarted server re-feeds; the operator's stop then
    cancels the re-feed: the start completes, the run is *stopped* (round 1 dropped,
    unaggregated), clients hear DONE with round 0's adapter, and the recorded uploads stay."""
    settings = settings_for(tmp_path)

    async def first_life() -> str:
        async with running_server(settings, synthetic_adapter()) as server:
            await before_the_crash(server.address)
            return server.spec.run_id

    run_id = asyncio.run(first_life())
    held = HeldRefeed(monkeypatch)

    async def second_life() -> tuple[RunPhase, RunPhase, str, int]:
        starting = asyncio.create_task(
            start_server(settings, initializer=initializer_of(synthetic_adapter())))
        await asyncio.wait_for(held.entered.wait(), timeout=30)
        stopped_in = await held.managers[0].stop_run(run_id)
        server = await asyncio.wait_for(starting, timeout=30)
        try:
            alice = WireClient(server.address, token_of("alice"), run_id=run_id)
            told = await alice.get_task(max_wait_s=0.0)
            final = len(await alice.download(1))
            await alice.close()
            return stopped_in, server.engine.phase, told.WhichOneof("task"), final
        finally:
            await server.stop(grace_s=0.5)

    stopped_in, phase, told, final_size = asyncio.run(second_life())
    assert stopped_in is RunPhase.WAITING  # for its resumed round to take uploads again
    assert phase is RunPhase.STOPPED
    assert told == "done" and final_size > 0
    reader = open_reader(settings.database_path)
    try:
        assert reader.run(run_id).phase is RunPhase.STOPPED
        closed = [(r.round_index, r.closed_at is not None) for r in reader.rounds(run_id)]
        assert closed == [(0, True), (1, False)]  # round 1 dropped, never aggregated
        assert [u.client for u in reader.uploads(run_id, 1)] == ["alice", "bob"]
    finally:
        reader.close()


def test_an_upload_that_cannot_be_recorded_is_not_acknowledged_nor_counted(
    tmp_path: Path,
) -> None:
    """Recording fails once (disk full, say): the client gets INTERNAL, the aggregate is
    rebuilt without that upload, and the retry is counted once."""
    settings = make_settings(tmp_path, ["alice", "bob"], rounds=1)

    async def scenario() -> tuple[grpc.StatusCode, list[tuple[str, bytes, int]], Adapter, Adapter]:
        async with running_server(settings, synthetic_adapter()) as server:
            record = server.store.record_upload
            failures = iter([True])

            def failing_once(row):  # noqa: ANN001, ANN202
                if row.client == "bob" and next(failures, False):
                    raise StoreError("disk full")
                return record(row)

            server.store.record_upload = failing_once  # type: ignore[method-assign]
            clients = {n: WireClient(server.address, token_of(n)) for n in ("alice", "bob")}
            await asyncio.gather(*(c.enroll() for c in clients.values()))
            sent, code = [], None
            for name in ("alice", "bob", "bob"):
                task = await train_task(clients[name])
                reference = adapter_of(await clients[name].download(0))
                update = update_of(name, task, reference)
                try:
                    await clients[name].upload(0, update, trained_of(task), key=f"k-{name}",
                                               sample_count=SAMPLES[name])  # fmt: skip
                    sent.append((name, update, SAMPLES[name]))
                except grpc.aio.AioRpcError as error:
                    code = error.code()
            while (await clients["alice"].get_task()).WhichOneof("task") != "done":
                pass
            final = adapter_of(await clients["alice"].download(1))
            for client in clients.values():
                await client.close()
            return code, sent, reference, final

    code, sent, reference, final = asyncio.run(scenario())
    assert code == grpc.StatusCode.INTERNAL
    assert [name for name, _, _ in sent] == ["alice", "bob"]
    assert_same(final, core_aggregate("fedrot", 0, reference, sent))


def test_a_restarted_server_serves_its_resumed_round_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restarted server re-feeds the open round's uploads before it serves: carol's upload,
    sent the moment the server is back, counts, though re-feeding is slow (before, it met "no
    round is open" and FAILED_PRECONDITION, which a client takes for a closed round)."""
    settings = settings_for(tmp_path)

    async def first_life() -> tuple[dict[tuple[int, str], bytes], frozenset]:
        async with running_server(settings, synthetic_adapter()) as server:
            return await before_the_crash(server.address)

    sent, trained = asyncio.run(first_life())
    refeed = RoundLedger.refeed

    async def slow_refeed(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        await asyncio.sleep(0.5)
        return await refeed(self, *args, **kwargs)

    monkeypatch.setattr(RoundLedger, "refeed", slow_refeed)

    async def second_life() -> int:
        async with running_server(settings, synthetic_adapter()) as server:
            carol = WireClient(server.address, token_of("carol"), run_id=server.spec.run_id)
            reference = adapter_of(await carol.download(1))
            update = encode_update(local_update(reference, trained, seed=1002))
            reply = await carol.upload(1, update, trained, key="key-carol-1",
                                       sample_count=SAMPLES["carol"])  # fmt: skip
            await carol.close()
            return reply.status

    assert asyncio.run(second_life()) == pb.UPLOAD_STATUS_ACCEPTED
    reader = open_reader(settings.database_path)
    try:
        assert [u.client for u in reader.uploads(reader.runs()[0].run_id, 1)] == [
            "alice", "bob", "carol"]  # fmt: skip
    finally:
        reader.close()
