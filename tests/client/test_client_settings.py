"""The client's settings: flags over environment over defaults, errors that name the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrot_client.settings import SettingsError, load_settings


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": 0}\n')
    return path


def test_flags_override_the_environment(monkeypatch, data: Path) -> None:
    monkeypatch.setenv("FEDROT_CLIENT_SERVER", "10.0.0.1:7000")
    monkeypatch.setenv("FEDROT_CLIENT_TOKEN", "env-token-0123456789")
    monkeypatch.setenv("FEDROT_CLIENT_MAX_WAIT_S", "12")
    settings = load_settings(["--data", str(data), "--server", "10.0.0.2:7001", "--no-progress"])
    assert settings.server == "10.0.0.2:7001"
    assert settings.max_wait_s == 12.0
    assert settings.read_token() == "env-token-0123456789"
    assert settings.progress is False and settings.show_progress() is False


def test_token_file(tmp_path: Path, data: Path) -> None:
    token = tmp_path / "token"
    token.write_text("file-token-0123456789\n")
    settings = load_settings(["--data", str(data), "--token-file", str(token)])
    assert settings.read_token() == "file-token-0123456789"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--server", "nohost"], "server = 'nohost'"),
        (["--max-wait-s", "0"], "max_wait_s = '0'"),
        (["--backoff-initial-s", "5", "--backoff-max-s", "1"], "backoff_max_s 1.0"),
        (["--labels", "/nonexistent/labels.json"], "labels '/nonexistent/labels.json'"),
    ],
)
def test_bad_values_are_named(flags: list[str], named: str, data: Path) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(["--data", str(data), "--token", "t" * 16, *flags])
    assert named in str(raised.value)


def test_token_is_required(data: Path) -> None:
    with pytest.raises(SettingsError, match="token"):
        load_settings(["--data", str(data)])


def test_label_vocabulary_comes_from_the_labels_file(tmp_path: Path, data: Path) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["neg", "pos"]))
    settings = load_settings(["--data", str(data), "--token", "t" * 16, "--labels", str(labels)])
    assert settings.label_vocabulary(2).id_of("pos") == 1
    with pytest.raises(SettingsError, match="list of 3 names"):
        settings.label_vocabulary(3)
    labels.write_text(json.dumps(["pos", "pos"]))
    with pytest.raises(SettingsError, match="labels .*duplicate label names"):
        settings.label_vocabulary(2)
    assert load_settings(["--data", str(data), "--token", "t" * 16]).label_vocabulary(3).names == (
        "0", "1", "2")  # fmt: skip
