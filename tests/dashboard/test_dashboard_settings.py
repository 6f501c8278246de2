"""The dashboard's server settings: listen address, tokens (validated, never echoed)."""

from __future__ import annotations

import pytest

from fedrot_server.errors import SettingsError
from fedrot_server.settings import load_settings

TOKENS = ["--tokens", "alice=token-alice-0123456789"]


def test_defaults_and_overrides() -> None:
    defaults = load_settings(TOKENS)
    assert defaults.dashboard_listen == "127.0.0.1:8080"
    assert defaults.admin_token is None and defaults.dashboard_read_token is None
    chosen = load_settings([*TOKENS, "--dashboard-listen", "", "--admin-token", "a" * 20,
                            "--dashboard-read-token", "r" * 20])  # fmt: skip
    assert chosen.dashboard_listen == "" and chosen.admin_token == "a" * 20


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--dashboard-listen", "8080"], "dashboard_listen = '8080'"),
        (["--admin-token", "too short"], "admin_token: "),
        (["--dashboard-read-token", "x" * 15], "dashboard_read_token: "),
    ],
)
def test_bad_values_are_named_and_tokens_not_echoed(argv: list[str], named: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings([*TOKENS, *argv])
    assert named in str(error.value)
    if "token" in argv[0]:
        assert argv[1] not in str(error.value)
