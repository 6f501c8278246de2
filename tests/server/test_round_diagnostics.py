"""The round summary's diagnostics through the real round engine: FedIT's error for the same
uploads and the rotation drift share, in the store and in report.json, for FedRot and FedIT."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from fedrot.strategies import StrategyConfig, build_strategy
from fedrot_server.storage.artifacts import RunArtifacts
from fedrot_server.runs.rounds import RoundEngine
from fedrot_server.runs.spec import InitialModel, RunSpec
from fedrot_server.storage.store import SqliteStore
from fedrot_server.runs.tasks import TrainTask, UploadRequest
from fedrot_server.rpc.transfers import sha256_hex
from fedrot_server.runs.worker import ThreadedWorker
from wire import encode_update, local_update, make_settings, synthetic_adapter

CLIENTS = ["alice", "bob", "carol"]
ROUNDS = 3
DIAGNOSTIC_KEYS = (
    "fedit_aggregation_error",
    "fedit_relative_aggregation_error",
    "error_removed_share",
    "rotation_drift_share",
    "applied_rotation_drift_share",
)


async def run_rounds(engine: RoundEngine) -> None:
    """Every client uploads a seeded fake update in every round until the run finishes."""
    await engine.start()
    for name in CLIENTS:
        engine.enroll(name, {})
    for round_index in range(ROUNDS):
        for i, name in enumerate(CLIENTS):
            task = await engine.next_task(name, "run-test", 10.0)
            assert isinstance(task, TrainTask) and task.round_index == round_index
            update = local_update(engine.reference, task.trained, seed=100 * round_index + i)
            payload = encode_update(update)
            ticket = await engine.open_upload(name, UploadRequest(
                run_id="run-test", round_index=round_index, sample_count=4 + i,
                total_size=len(payload), sha256=sha256_hex(payload),
                idempotency_key=f"{name}-{round_index}", factors=task.trained))  # fmt: skip
            try:
                ticket.receiver.add(0, payload)
                await engine.commit_upload(ticket, await ticket.receiver.finish())
            finally:
                engine.release(ticket)
    await engine.wait_finished()


def summaries_and_reports(tmp_path: Path, strategy_name: str) -> list[tuple[dict, dict]]:
    """``(store summary, report.json)`` of every round of a run of ``strategy_name``."""
    settings = make_settings(tmp_path, CLIENTS, rounds=ROUNDS, max_task_wait_s=1.0)
    spec = RunSpec.from_settings(settings, "run-test")
    initial = InitialModel(synthetic_adapter(), "")
    strategy = build_strategy(strategy_name, StrategyConfig(lam=0.4))
    store = SqliteStore(settings.database_path)
    store.sync_client_tokens(settings.client_tokens())
    worker = ThreadedWorker(strategy, initial.schema)
    artifacts = RunArtifacts(settings.state_dir, spec.run_id, {"r": 2})
    engine = RoundEngine(settings, spec, store=store, worker=worker, strategy=strategy,
                         initial=initial, artifacts=artifacts)  # fmt: skip

    async def scenario() -> None:
        try:
            await run_rounds(engine)
        finally:
            await engine.stop()
            await worker.close()

    try:
        asyncio.run(scenario())
        rows = store.rounds("run-test")
    finally:
        store.close()
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for row in rows:
        report = json.loads((artifacts.round_dir(row.round_index) / "report.json").read_text())
        out.append((dict(row.summary), report))
    assert [row.round_index for row in rows] == list(range(ROUNDS))
    return out


def test_fedrot_rounds_report_fedits_error_and_the_drift_share(tmp_path: Path) -> None:
    rounds = summaries_and_reports(tmp_path, "fedrot")
    for index, (summary, report) in enumerate(rounds):
        assert set(DIAGNOSTIC_KEYS) <= set(summary)
        assert report["summary"] == summary
        aggregation = report["aggregation"]
        assert aggregation["fedit_aggregation_error"] == summary["fedit_aggregation_error"]
        if index == 0:  # B_ref = 0: round 0 does not align, FedIT's error is its own
            assert summary["aligned"] is None and summary["rotation_drift_share"] is None
            assert aggregation["rotation_drift"] == []
            assert summary["fedit_aggregation_error"] == summary["factor_average_error"]
            continue
        assert summary["aligned"] in ("A", "B")
        assert 0.0 < summary["rotation_drift_share"] < 1.0
        assert summary["applied_rotation_drift_share"] < summary["rotation_drift_share"]
        assert summary["fedit_aggregation_error"] != pytest.approx(
            summary["aggregation_error"], rel=1e-3
        )
        modules = aggregation["rotation_drift"]
        assert {m["module"] for m in modules} == {m["module"] for m in aggregation["modules"]}
        removed = sum(m["removed"] for m in modules) / sum(m["drift"] for m in modules)
        assert summary["rotation_drift_share"] == pytest.approx(removed, rel=1e-9)
        for module in aggregation["modules"]:
            assert module["fedit_aggregation_error"] is not None
        ratio = summary["aggregation_error"] / summary["fedit_aggregation_error"]
        assert summary["error_removed_share"] == pytest.approx(1.0 - ratio, rel=1e-9)


def test_under_fedit_the_fedit_error_is_the_rounds_own(tmp_path: Path) -> None:
    for summary, report in summaries_and_reports(tmp_path, "fedit"):
        assert set(DIAGNOSTIC_KEYS) <= set(summary)
        assert summary["aggregation_error"] > 0.0
        assert summary["fedit_aggregation_error"] == pytest.approx(
            summary["aggregation_error"], rel=1e-12
        )
        assert summary["fedit_relative_aggregation_error"] == pytest.approx(
            summary["relative_aggregation_error"], rel=1e-12
        )
        assert summary["error_removed_share"] == pytest.approx(0.0, abs=1e-12)
        assert summary["rotation_drift_share"] is None
        for module in report["aggregation"]["modules"]:
            assert module["fedit_aggregation_error"] == pytest.approx(
                module["aggregation_error"], rel=1e-12
            )
