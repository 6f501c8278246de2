"""Round t's adapter is evaluated on its own thread while round t + 1 trains: the next round
opens before the evaluation returns, the scores land in the closed round's summary, metrics and
report.json, the run finishes only after its last evaluation, and each worker thread runs with
the torch thread count it was given."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import torch

from fedrot.adapters import Adapter
from fedrot_server.service import start_server
from fedrot_server.storage.state import RunPhase
from wire import (
    WireClient,
    adapter_of,
    assert_same,
    initializer_of,
    killed,
    make_settings,
    synthetic_adapter,
    token_of,
    trained_of,
)


def test_the_next_round_trains_while_the_last_one_is_evaluated(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"], rounds=2, aggregation_threads=2,
                             evaluation={"threads": 1})  # fmt: skip
    release = threading.Event()
    seen: list[tuple[str, int]] = []

    def evaluate(adapter: Adapter) -> dict[str, float]:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        assert release.wait(60), "the test never released the evaluation"
        return {"accuracy": 0.5 + 0.25 * (len(seen) - 1)}

    async def train(client: WireClient) -> int:
        task = (await client.get_task(5.0)).train
        payload = await client.download(task.round)
        await client.upload(task.round, payload, trained_of(task))
        return task.round

    async def scenario() -> None:
        server = await start_server(settings, initializer=initializer_of(synthetic_adapter()),
                                    evaluator=evaluate)  # fmt: skip
        run_id = server.spec.run_id
        try:
            alice = WireClient(server.address, token_of("alice"))
            await alice.enroll()
            assert await train(alice) == 0
            # Round 0's evaluation is blocked; round 1 is offered and trained all the same.
            assert await train(alice) == 1
            assert seen and seen[0][0].startswith("fedrot-evaluation")
            round0 = server.store.rounds(run_id)[0]
            assert round0.phase.value == "closed" and round0.summary["evaluating"] is True
            assert round0.summary["evaluation"] == {}
            await asyncio.sleep(0.5)
            assert server.store.run(run_id).phase is not RunPhase.FINISHED  # waits for scores
            release.set()
            await asyncio.wait_for(server.engine.wait_finished(), 30)
            assert server.store.run(run_id).phase is RunPhase.FINISHED
            summaries = [r.summary for r in server.store.rounds(run_id)]
            assert [s["evaluation"] for s in summaries] == [{"accuracy": 0.5}, {"accuracy": 0.75}]
            assert all(s["evaluating"] is False and s["evaluation_s"] >= 0 for s in summaries)
            metrics = [(m.round_index, m.value) for m in server.store.metrics(run_id)
                       if m.source == "server"]  # fmt: skip
            assert metrics == [(0, 0.5), (1, 0.75)]
            report = server.engine._artifacts.round_dir(0) / "report.json"
            assert json.loads(report.read_text())["summary"]["evaluation"] == {"accuracy": 0.5}
            assert await server.worker.run(torch.get_num_threads) == 2
            assert [threads for _, threads in seen] == [1, 1]
            await alice.close()
        finally:
            release.set()
            await server.stop(0.1)

    asyncio.run(scenario())


def test_threads_default_to_sharing_the_cpus(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert make_settings(tmp_path, ["alice"]).thread_counts() == (4, 4)
    assert make_settings(tmp_path, ["alice"], evaluation={"threads": 2}).thread_counts() == (6, 2)
    assert make_settings(tmp_path, ["alice"], aggregation_threads=3).thread_counts() == (3, 4)
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert make_settings(tmp_path, ["alice"]).thread_counts() == (1, 1)


def test_an_evaluation_cut_short_by_a_crash_runs_again_on_resume(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"], rounds=2)
    release = threading.Event()

    def stuck(adapter: Adapter) -> dict[str, float]:
        release.wait(60)
        return {"accuracy": 0.0}

    scored: list[Adapter] = []

    def evaluate(adapter: Adapter) -> dict[str, float]:
        scored.append(adapter)
        return {"accuracy": 0.25}

    async def scenario() -> None:
        server = await start_server(settings, initializer=initializer_of(synthetic_adapter()),
                                    evaluator=stuck)  # fmt: skip
        run_id = server.spec.run_id
        alice = WireClient(server.address, token_of("alice"))
        await alice.enroll()
        task = (await alice.get_task(5.0)).train
        payload = await alice.download(task.round)
        await alice.upload(task.round, payload, trained_of(task))
        for _ in range(100):
            if server.store.rounds(run_id)[0].closed_at is not None:
                break
            await asyncio.sleep(0.05)
        await alice.close()
        await killed(server)  # round 0 closed, its evaluation in flight
        release.set()

        server = await start_server(settings, initializer=initializer_of(synthetic_adapter()),
                                    evaluator=evaluate)  # fmt: skip
        try:
            assert server.spec.run_id == run_id
            for _ in range(200):
                if server.store.rounds(run_id)[0].summary["evaluating"] is False:
                    break
                await asyncio.sleep(0.05)
            assert server.store.rounds(run_id)[0].summary["evaluation"] == {"accuracy": 0.25}
            (adapter,) = scored
            assert_same(adapter, adapter_of(server.engine._artifacts.read_adapter(0)))
        finally:
            await server.stop(0.1)

    asyncio.run(scenario())
