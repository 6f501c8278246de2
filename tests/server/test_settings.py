"""Settings: flags over environment over config file over defaults; errors name the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrot.strategies import StrategyName
from fedrot_server.errors import SettingsError
from fedrot_server.run_settings import Portion, parse_portion
from fedrot_server.settings import load_settings

TOKEN = "alice=token-alice-0123456789"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("FEDROT_SERVER_"):
            monkeypatch.delenv(key)


def test_defaults_and_flags() -> None:
    settings = load_settings(["--tokens", TOKEN, "--rounds", "7", "--lora.rank", "8",
                              "--strategy.name", "fedit", "--clients-per-round", "0.5",
                              "--no-track-error", "--listen", "127.0.0.1:0"])  # fmt: skip
    assert settings.rounds == 7 and settings.lora.rank == 8
    assert settings.strategy.name is StrategyName.FEDIT
    assert settings.clients_per_round == Portion(fraction=0.5)
    assert settings.track_error is False
    assert settings.client_tokens() == {"alice": "token-alice-0123456789"}
    assert settings.quorum == Portion(count=1)
    assert settings.lora.target_modules == ["query", "value"]
    assert settings.max_upload_value == 1e4


def test_flags_override_environment_override_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "server.toml"
    config.write_text('rounds = 3\nmin_clients = 4\n[lora]\nrank = 16\nalpha = 32.0\n'
                      '[tokens]\nbob = "token-bob-0123456789ab"\n')  # fmt: skip
    monkeypatch.setenv("FEDROT_SERVER_ROUNDS", "5")
    monkeypatch.setenv("FEDROT_SERVER_LORA__RANK", "12")
    settings = load_settings(["--config", str(config), "--min-clients", "6"])
    assert settings.rounds == 5  # environment over file
    assert settings.min_clients == 6  # flag over file
    assert settings.lora.rank == 12 and settings.lora.alpha == 32.0  # merged per key
    assert settings.client_tokens() == {"bob": "token-bob-0123456789ab"}


def test_json_config_file_through_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"quorum": "0.5", "tokens": {"c1": "x" * 20}}))
    monkeypatch.setenv("FEDROT_SERVER_CONFIG", str(config))
    assert load_settings([]).quorum == Portion(fraction=0.5)


def test_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# clients\nalice = token-alice-0123456789\n\nbob=token-bob-0123456789ab\n")
    settings = load_settings(["--tokens-file", str(tokens)])
    assert settings.client_tokens() == {
        "alice": "token-alice-0123456789", "bob": "token-bob-0123456789ab",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--lora.rank", "0"], "lora.rank = '0'"),
        (["--strategy.alignment-strength", "1.5"], "strategy.alignment_strength = '1.5'"),
        (["--strategy.name", "fedavg"], "strategy.name = 'fedavg'"),
        (["--listen", "localhost"], "listen = 'localhost'"),
        (["--listen", "127.0.0.1:70000"], "listen = '127.0.0.1:70000'"),
        (["--clients-per-round", "1.5"], "clients_per_round = '1.5'"),
        (["--clients-per-round", "some"], "clients_per_round = 'some'"),
        (["--quorum", "0"], "quorum = '0'"),
        (["--round-deadline-s", "-1"], "round_deadline_s = '-1'"),
        (["--chunk-bytes", str(5 * 1024 * 1024)], "chunk_bytes"),
        (["--device", "tpu"], "device = 'tpu'"),
        (["--max-upload-value", "1e6"], "max_upload_value = '1e6'"),
        (["--max-upload-value", "0"], "max_upload_value = '0'"),
        (["--model.num-labels", "1"], "num_labels >= 2, got 1"),
        (["--training.local-steps", "0"], "local_steps (0) and epochs (0)"),
        (["--tokens", "alice=short"], "alice"),
        (["--tokens", "a/b=token-alice-0123456789"], "'a/b'"),
    ],
)
def test_invalid_values_are_named(argv: list[str], named: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(["--tokens", TOKEN, *argv] if "--tokens" not in argv else argv)
    assert named in str(error.value)


def test_cross_field_errors() -> None:
    with pytest.raises(SettingsError, match="quorum 5 exceeds clients_per_round 3"):
        load_settings(["--tokens", TOKEN, "--clients-per-round", "3", "--quorum", "5"])
    with pytest.raises(SettingsError, match="no client tokens"):
        load_settings([])
    with pytest.raises(SettingsError, match="clients 'alice' and 'bob' have the same token"):
        load_settings(["--tokens", TOKEN, "--tokens", "bob=token-alice-0123456789"])


def test_bad_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("rounds = [")
    with pytest.raises(SettingsError, match="server.toml"):
        load_settings(["--config", str(config)])
    config.write_text("roundz = 3\n")
    with pytest.raises(SettingsError, match="roundz"):
        load_settings(["--config", str(config), "--tokens", TOKEN])


@pytest.mark.parametrize(
    ("text", "portion", "of_ten"),
    [("3", Portion(count=3), 3), (3, Portion(count=3), 3), ("0.25", Portion(fraction=0.25), 3),
     ("all", Portion(fraction=1.0), 10), (1.0, Portion(fraction=1.0), 10), ("20", Portion(count=20), 10)],
)  # fmt: skip
def test_portions(text: object, portion: Portion, of_ten: int) -> None:
    assert parse_portion(text) == portion
    assert portion.of(10) == of_ten
    assert portion.of(0) == 0
