"""The run's class names: one setting (``model.labels``, ``evaluation.labels`` its deprecated
alias), carried to every client in ``ModelSpec.label_names``; and the global adapters' header
metadata names the folder they are saved in."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from fedrot.codec import decode_adapter
from fedrot_server.storage.artifacts import BASE_DELTAS_FILE, RunArtifacts, adapter_metadata
from fedrot_server.errors import SettingsError
from fedrot_server.run_settings import ModelSettings
from fedrot_server.settings import load_settings
from wire import WireClient, make_settings, running_server, synthetic_adapter, token_of

TOKEN = "alice=token-alice-0123456789"
NAMES = ["cooking", "music", "sports"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("FEDROT_SERVER_"):
            monkeypatch.delenv(key)


def settings_of(*flags: str):  # noqa: ANN201
    return load_settings(["--tokens", TOKEN, *flags])


def test_num_labels_follows_the_names() -> None:
    settings = settings_of("--model.labels", '["cooking", "music", "sports"]')
    assert settings.model.labels == NAMES and settings.model.num_labels == 3
    assert settings.run_settings().model == settings.model
    agreeing = settings_of("--model.labels", "cooking,music,sports", "--model.num-labels", "3")
    assert agreeing.model.labels == NAMES


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--model.labels", '["a", "b"]', "--model.num-labels", "3"),
         "model: Value error, labels has 2 names but num_labels is 3"),
        (("--model.labels", '["a", "b", "a"]'),
         "model: Value error, labels must be distinct, repeated: ['a']"),
        (("--model.labels", '["a", " "]'), "model: Value error, labels must be non-empty names"),
        (("--model.task", "causal-lm", "--model.labels", '["a", "b"]'),
         "model: Value error, labels name classes, but task is causal-lm"),
        (("--model.labels", '["a", "b"]', "--evaluation.labels", '["a", "c"]'),
         "evaluation.labels (deprecated) differs from model.labels"),
        (("--model.num-labels", "4", "--evaluation.labels", '["a", "b", "c"]'),
         "labels has 3 names but num_labels is 4"),
    ],
)  # fmt: skip
def test_bad_names_are_refused_in_one_line(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(SettingsError) as error:
        settings_of(*flags)
    (line,) = str(error.value).splitlines()[1:]
    assert message in line


def test_evaluation_labels_is_a_deprecated_alias_of_model_labels(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_of("--evaluation.labels", '["cooking", "music", "sports"]')
    assert settings.model.labels == NAMES and settings.model.num_labels == 3
    assert "evaluation.labels is deprecated" in caplog.text
    both = settings_of("--model.labels", '["cooking", "music", "sports"]',
                       "--evaluation.labels", '["cooking", "music", "sports"]')  # fmt: skip
    assert both.model.labels == NAMES


def test_names_from_a_config_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[model]\nname = "tiny-bert"\nlabels = ["cooking", "music", "sports"]\n')
    assert settings_of("--config", str(config)).model.num_labels == 3
    monkeypatch.setenv("FEDROT_SERVER_MODEL__LABELS", '["x", "y"]')
    assert settings_of().model.labels == ["x", "y"]


def test_a_run_recorded_without_names_is_not_held_to_them() -> None:
    from types import SimpleNamespace

    from fedrot_server.runs.recovery import check_compatible

    old = {k: v for k, v in ModelSettings(num_labels=3).model_dump(mode="json").items()
           if k != "labels"}  # fmt: skip
    current = {"model": ModelSettings(labels=NAMES).model_dump(mode="json")}
    check_compatible(SimpleNamespace(run_id="run-old", spec={"model": old}), current)
    renamed = {"model": ModelSettings(labels=["a", "b", "c"]).model_dump(mode="json")}
    with pytest.raises(SettingsError, match="model.labels was"):
        check_compatible(SimpleNamespace(run_id="run-old", spec=current), renamed)


@pytest.mark.parametrize("where", ["model", "evaluation"])
def test_enrolment_carries_the_names_on_the_wire(tmp_path: Path, where: str) -> None:
    settings = make_settings(tmp_path, ["alice"], **{where: {"labels": NAMES}})

    async def scenario() -> tuple[list[str], int]:
        async with running_server(settings, synthetic_adapter()) as server:
            client = WireClient(server.address, token_of("alice"))
            response = await client.enroll(host="test")
            await client.close()
            return list(response.run.model.label_names), response.run.model.num_labels

    assert asyncio.run(scenario()) == (NAMES, 3)


def test_a_run_without_names_sends_none(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"], model={"num_labels": 3})

    async def scenario() -> list[str]:
        async with running_server(settings, synthetic_adapter()) as server:
            client = WireClient(server.address, token_of("alice"))
            response = await client.enroll(host="test")
            await client.close()
            return list(response.run.model.label_names)

    assert asyncio.run(scenario()) == []


def test_metadata_round_is_the_folder_the_adapter_is_saved_in(tmp_path: Path) -> None:
    assert adapter_metadata("r1", None) == {"run_id": "r1", "round": "initial",
                                            "starts_round": "0", "format": "pt"}  # fmt: skip
    assert adapter_metadata("r1", 4)["round"] == "4"
    assert adapter_metadata("r1", 4)["starts_round"] == "5"
    artifacts = RunArtifacts(tmp_path, "r1", {})
    deltas = {"base_model.model.encoder.0.query": torch.ones(8, 6)}
    for round_index in range(2):
        artifacts.save_round(round_index, b"adapter", {}, deltas)
        saved = artifacts.round_dir(round_index) / BASE_DELTAS_FILE
        metadata = decode_adapter(saved.read_bytes()).metadata
        assert metadata["round"] == saved.parent.name == str(round_index)
