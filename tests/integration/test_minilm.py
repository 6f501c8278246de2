"""The real all-MiniLM-L6-v2: three client processes, two FedRot rounds, server evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from peft import AutoPeftModelForSequenceClassification, PeftModel

from fedrot_client.data import LabelVocabulary, load_dataset
from fedrot_client.evaluation import evaluate
from fedrot_client.models import ModelSpec, load_base_model
from fedrot_server.run_settings import LoraSettings, ModelSettings, TrainingSettings
from harness import CLIENT_NAMES, client_shards, evaluation_on, held_out, tiny_settings

pytestmark = pytest.mark.slow


def test_minilm_federation_learns_and_exports_a_peft_adapter(
    start_server, clients, tmp_path: Path
) -> None:
    shards = client_shards(tmp_path / "data", sizes=(24, 24, 24))
    evaluation = held_out(tmp_path / "data")
    settings = tiny_settings(
        tmp_path / "server",
        model=ModelSettings(name="minilm", num_labels=4, seed=0),
        lora=LoraSettings(rank=4, alpha=8.0, dropout=0.05, target_modules=["query", "value"]),
        training=TrainingSettings(local_steps=6, batch_size=8, learning_rate=5e-3,
                                  optimizer="adamw", max_length=24),  # fmt: skip
        evaluation=evaluation_on(evaluation),
    )
    server = start_server(settings)
    started = [clients.start(name, server.address, shard)
               for name, shard in zip(CLIENT_NAMES, shards, strict=True)]  # fmt: skip
    assert [client.wait() for client in started] == [0, 0, 0], [c.log() for c in started]
    server.wait_finished()
    for client in started:
        assert "not checking" not in client.log()  # the run named MiniLM's fingerprint

    logged = [server.report(r)["summary"]["evaluation"] for r in (0, 1)]
    # Better than a uniform guess over the 4 classes (loss ln 4 = 1.386, accuracy 0.25).
    assert logged[1]["loss"] < math.log(4) and logged[1]["accuracy"] > 0.25
    base = load_base_model(ModelSpec("minilm", num_labels=4, seed=0))
    model = PeftModel.from_pretrained(base.model, server.run_dir / "rounds" / "1" / "adapter")
    dataset = load_dataset(evaluation, vocabulary=LabelVocabulary.of_size(4))
    result = evaluate(model, base.tokenizer, dataset, batch_size=64, max_length=24)
    assert result.accuracy == pytest.approx(logged[1]["accuracy"], abs=1e-9)
    assert result.loss == pytest.approx(logged[1]["loss"], rel=1e-5)
    # The published folder loads alone, offline (its base is a local folder), as the same model.
    published = AutoPeftModelForSequenceClassification.from_pretrained(
        server.run_dir / "rounds" / "1" / "adapter"
    )
    alone = evaluate(published, base.tokenizer, dataset, batch_size=64, max_length=24)
    assert alone.loss == pytest.approx(result.loss, rel=1e-5)
