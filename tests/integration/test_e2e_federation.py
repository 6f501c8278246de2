"""A full federation (real server, three real client processes, tiny BERT) for FedRot and FedIT.

One run per strategy (module-scoped); the tests read what it left: the clients' exit status and
logs, the server's round reports, uploads and adapters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedrot.cli import main as fedrot_cli
from fedrot_client.data import LabelVocabulary, load_dataset
from fedrot_client.evaluation import evaluate
from fedrot_client.models import ModelSpec, load_base_model
from fedrot_server.run_settings import StrategySettings
from fedrot_server.storage.state import RunPhase
from fedrot_server.storage.store import open_reader
from harness import (
    CLIENT_NAMES,
    Clients,
    ServerThread,
    client_shards,
    evaluation_on,
    held_out,
    tiny_settings,
)

WEIGHTS = "adapter_model.safetensors"
LAMBDA = 0.4


@dataclass(frozen=True)
class FinishedRun:
    strategy: str
    server: ServerThread
    held_out: Path
    exit_codes: dict[str, int]
    logs: dict[str, str]


@pytest.fixture(scope="module", params=["fedrot", "fedit"])
def finished_run(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[FinishedRun]:
    root = tmp_path_factory.mktemp(request.param)
    # Shards smaller than the batch (16) make the clients' sample counts, so weights, differ.
    shards = client_shards(root / "data", sizes=(10, 20, 30))
    evaluation = held_out(root / "data")
    strategy = StrategySettings(name=request.param, alignment_strength=LAMBDA)
    settings = tiny_settings(root / "server", strategy=strategy,
                             evaluation=evaluation_on(evaluation))  # fmt: skip
    server = ServerThread(settings)
    clients = Clients(root / "clients")
    try:
        for name, shard in zip(CLIENT_NAMES, shards, strict=True):
            clients.start(name, server.address, shard)
        codes = {client.name: client.wait() for client in clients.started}
        server.wait_finished()
        logs = {client.name: client.log() for client in clients.started}
        yield FinishedRun(request.param, server, evaluation, codes, logs)
    finally:
        clients.stop()
        server.stop()


def test_every_client_trains_every_round_and_exits_cleanly(finished_run: FinishedRun) -> None:
    assert finished_run.exit_codes == dict.fromkeys(CLIENT_NAMES, 0), finished_run.logs
    for round_index in (0, 1):
        summary = finished_run.server.report(round_index)["summary"]
        assert sorted(summary["reporters"]) == sorted(CLIENT_NAMES)
        assert summary["strategy"] == finished_run.strategy
        assert 0.0 <= summary["evaluation"]["accuracy"] <= 1.0
        assert summary["client_metrics"]["train_loss"] > 0
    for log in finished_run.logs.values():
        assert "round 0: update accepted" in log and "round 1: update accepted" in log
    reader = open_reader(finished_run.server.settings.database_path)
    try:
        assert reader.run(finished_run.server.run_id).phase is RunPhase.FINISHED
    finally:
        reader.close()


def test_server_aggregate_equals_fedrot_aggregate_on_the_same_uploads(
    finished_run: FinishedRun, tmp_path: Path
) -> None:
    """Round 1 (FedRot aligns A in odd rounds) against the offline command on its uploads."""
    server, rounds = finished_run.server, finished_run.server.run_dir / "rounds"
    counts = server.sample_counts(1)
    assert len(set(counts.values())) > 1  # unequal weights, so the weighting is checked too
    uploads = [f"{rounds / '1' / 'uploads' / f'{name}.safetensors'}:{count}"
               for name, count in counts.items()]  # fmt: skip
    out = tmp_path / "aggregate.safetensors"
    status = fedrot_cli(["aggregate", "--strategy", finished_run.strategy, "--lambda", str(LAMBDA),
                         "--align", "A", "--reference", str(rounds / "0" / "adapter" / WEIGHTS),
                         "--out", str(out), *uploads])  # fmt: skip
    assert status == 0
    offline, served = load_file(str(out)), load_file(str(rounds / "1" / "adapter" / WEIGHTS))
    assert offline.keys() == served.keys()
    for key in served:
        torch.testing.assert_close(served[key], offline[key], rtol=1e-5, atol=1e-6, msg=key)


def test_exported_adapter_loads_in_peft_and_reproduces_the_logged_evaluation(
    finished_run: FinishedRun,
) -> None:
    server = finished_run.server
    logged = server.report(1)["summary"]["evaluation"]
    spec = server.settings.model
    base = load_base_model(ModelSpec(spec.name, num_labels=spec.num_labels, seed=spec.seed))
    model = PeftModel.from_pretrained(base.model, server.run_dir / "rounds" / "1" / "adapter")
    dataset = load_dataset(finished_run.held_out, vocabulary=LabelVocabulary.of_size(4))
    result = evaluate(model, base.tokenizer, dataset, batch_size=64,
                      max_length=server.settings.training.max_length)  # fmt: skip
    assert result.num_samples == logged["num_samples"]
    assert result.accuracy == pytest.approx(logged["accuracy"], abs=1e-9)
    assert result.loss == pytest.approx(logged["loss"], rel=1e-5)
