"""The server's one typed settings object.

Sources, highest priority first: command-line flags (``--lora.rank 8``, ``--rounds 10``),
environment variables (``FEDROT_SERVER_ROUNDS=10``, nested with ``__``:
``FEDROT_SERVER_LORA__RANK=8``), an optional TOML or JSON file (``--config server.toml`` or
``FEDROT_SERVER_CONFIG``), then the defaults below. :func:`load_settings` validates everything
at start and raises :class:`SettingsError` naming each bad setting and its value.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic import field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from pydantic_settings import SettingsConfigDict

from fedrot_server.checks import check_dashboard_token, check_secret, parse_listen
from fedrot_server.checks import read_secret_file
from fedrot_server.errors import SettingsError
from fedrot_server.run_settings import CLIENT_NAME, RUN_FIELDS, RunSettings

ENV_PREFIX = "FEDROT_SERVER_"
MIB = 1024 * 1024
MAX_CHUNK_BYTES = 4 * MIB
DEFAULT_MAX_UPLOAD_VALUE = 1e4
"""The largest magnitude an uploaded value may have by default. Trained LoRA factors and heads
stay orders of magnitude below it (a finite update of 1e37 would turn the global adapter into Inf
and NaN, and every later round's alignment with it)."""
LARGEST_MAX_UPLOAD_VALUE = 1e5
"""The cap on ``max_upload_value``: the aggregation error's Gram products grow as
``v^4 d^2 r^2 N^2``, about 1e36 at v = 1e5 for d = 16384, r = 64 and N = 100, below float32's
3.4e38."""


class ServerSettings(BaseSettings, RunSettings):
    """The aggregation server's settings: its own, and (flat, inherited from
    :class:`RunSettings`) the run a single-run server serves. Sources, highest priority first:
    flags, environment variables (FEDROT_SERVER_ and the name in capitals, __ between nested
    names: --lora.rank is FEDROT_SERVER_LORA__RANK), the --config file, the defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        cli_prog_name="fedrot-server",
        cli_kebab_case=True,
        cli_implicit_flags=True,
    )

    config: Path | None = Field(None, description="TOML or JSON file of settings")
    listen: str = Field("127.0.0.1:50051", description="host:port to serve on (port 0: any)")
    state_dir: Path = Field(Path("state"), description="SQLite database and run artifacts")
    standing: bool = Field(
        False,
        description="serve with no run and take runs submitted over the admin API (POST "
        "/api/v1/runs), one at a time in submission order; the run settings given at start "
        "are then ignored",
    )
    client_timeout_s: float = Field(
        120.0, gt=0,
        description="a client silent this long is not sampled (and is replaced in an extended round)",
    )  # fmt: skip
    heartbeat_interval_s: float = Field(10.0, gt=0, description="heartbeat period asked of clients")
    max_task_wait_s: float = Field(30.0, gt=0, description="server bound of a GetTask long poll")
    upload_takeover_s: float = Field(
        10.0, gt=0, description="how long a client's retried upload waits for its broken first one"
    )
    upload_stall_s: float = Field(
        60.0, gt=0, description="an upload with no message for this long is abandoned"
    )
    tokens: dict[str, str] = Field(default_factory=dict, description="client name=token pairs")
    tokens_file: Path | None = Field(None, description="file of name=token lines")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve TLS")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA of client certificates: require mutual TLS"
    )
    max_upload_bytes: int = Field(
        1024 * MIB, ge=1,
        description="outer cap on an upload's size; each run also refuses anything above the "
        "largest encoding of its adapter schema",
    )  # fmt: skip
    max_upload_value: float = Field(
        DEFAULT_MAX_UPLOAD_VALUE,
        gt=0,
        le=LARGEST_MAX_UPLOAD_VALUE,
        description="largest magnitude an uploaded value may have; larger uploads are refused",
    )
    chunk_bytes: int = Field(1 * MIB, ge=1024, le=MAX_CHUNK_BYTES, description="download chunk size")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="aggregation device")
    track_error: bool = Field(True, description="compute the exact aggregation error each round")
    aggregation_threads: int | None = Field(
        None, ge=1,
        description="torch CPU threads of the aggregation worker (unset: the CPUs the "
        "evaluation does not take, at least 1)",
    )  # fmt: skip
    keep_uploads: bool = Field(True, description="keep every accepted upload under the run's folder")
    resume: bool = Field(
        True,
        description="resume the run a crash left unfinished in state_dir (its settings must "
        "match); false: always start a new run",
    )
    linger_s: float = Field(
        30.0, ge=0, description="keep serving this long after the run so every client hears DONE"
    )
    final_download_grace_s: float = Field(
        5.0,
        ge=0,
        description="after every client heard DONE, keep serving this long for their final downloads",
    )
    dashboard_listen: str = Field(
        "127.0.0.1:8080",
        description="host:port of the web dashboard (port 0: any); empty: no dashboard",
    )
    admin_token: str | None = Field(
        None, description="token for the dashboard's admin actions (unset: they are refused)"
    )
    dashboard_read_token: str | None = Field(
        None, description="token needed to read the dashboard and its API (unset: open)"
    )
    admin_token_file: Path | None = Field(None, description="file whose first line is admin_token")
    dashboard_read_token_file: Path | None = Field(
        None, description="file whose first line is dashboard_read_token"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first. CLI flags come before all (pydantic-settings puts them
        # there); the init arguments carry the config file, below the environment.
        return (env_settings, init_settings)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("dashboard_listen")
    @classmethod
    def _check_dashboard_listen(cls, value: str) -> str:
        if value:
            parse_listen(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _read_token_files(cls, data: Any) -> Any:
        """``admin_token_file`` and ``dashboard_read_token_file``: the token is the first line."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in ("admin_token", "dashboard_read_token"):
            path = data.get(f"{name}_file")
            if path in (None, ""):
                continue
            if data.get(name) not in (None, ""):
                raise ValueError(f"give {name} or {name}_file, not both")
            data[name] = read_secret_file(str(path), f"{name}_file")
        return data

    @field_validator("admin_token", "dashboard_read_token")
    @classmethod
    def _check_dashboard_token(cls, value: str | None) -> str | None:
        return None if value is None else check_dashboard_token(value)

    @field_validator("tokens")
    @classmethod
    def _check_tokens(cls, value: dict[str, str]) -> dict[str, str]:
        for name, token in value.items():
            check_token(name, token)
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> ServerSettings:
        if not self.client_tokens():
            raise ValueError("no client tokens: give --tokens name=token or --tokens-file")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give both tls_cert_file and tls_key_file, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    def run_settings(self) -> RunSettings:
        """The run given at start (a single-run server's run)."""
        return RunSettings.model_validate({name: getattr(self, name) for name in RUN_FIELDS})

    def for_run(self, run: RunSettings) -> ServerSettings:
        """These settings with ``run``'s per-run fields: what the engine of ``run`` reads."""
        return self.model_copy(update={name: getattr(run, name) for name in RUN_FIELDS})

    def client_tokens(self) -> dict[str, str]:
        """``name -> token`` from ``tokens_file`` (lines ``name=token``) and ``tokens`` (which
        wins for a name in both); ValueError naming both clients when two share a token."""
        tokens = dict(read_tokens_file(self.tokens_file)) if self.tokens_file else {}
        tokens.update(self.tokens)
        holders: dict[str, str] = {}
        for name, token in sorted(tokens.items()):
            if token in holders:
                raise ValueError(f"clients {holders[token]!r} and {name!r} have the same token")
            holders[token] = name
        return tokens

    def thread_counts(self) -> tuple[int, int]:
        """torch CPU threads of ``(aggregation, evaluation)``: as set, else the evaluation takes
        half the CPUs and the aggregation the rest (each at least 1)."""
        cpus = os.cpu_count() or 1
        evaluation = self.evaluation.threads or max(1, cpus // 2)
        return self.aggregation_threads or max(1, cpus - evaluation), evaluation

    @property
    def database_path(self) -> Path:
        return self.state_dir / "fedrot.sqlite3"


def check_token(name: str, token: str) -> None:
    if not CLIENT_NAME.fullmatch(name):
        raise ValueError(f"client name {name!r} must be 1-64 of A-Z a-z 0-9 . _ - (not a dot first)")
    try:
        check_secret(token)
    except ValueError as exc:
        raise ValueError(f"token of client {name!r} {exc}") from None


def read_tokens_file(path: Path) -> dict[str, str]:
    """Lines ``name=token``; blank lines and ``#`` comments are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"tokens_file {path}: {exc.strerror}") from exc
    tokens: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, sep, token = text.partition("=")
        if not sep:
            raise ValueError(f"tokens_file {path}:{number}: expected name=token")
        check_token(name.strip(), token.strip())
        tokens[name.strip()] = token.strip()
    return tokens


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a ``.toml`` or ``.json`` file (keys as the field names)."""
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: expected a table of settings")
    return data


def load_settings(argv: Sequence[str] = ()) -> ServerSettings:
    """Settings from flags ``argv``, the environment and the config file they name."""
    environ = os.environ
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=environ.get(ENV_PREFIX + "CONFIG"))
    known, _ = pre.parse_known_args(list(argv))
    from_file = read_config_file(known.config) if known.config else {}
    try:
        return ServerSettings(_cli_parse_args=list(argv), **from_file)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from exc


def describe_errors(exc: ValidationError) -> str:
    """One line per bad setting: its dotted name, the value given and what is wrong."""
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        given = error.get("input")
        secret = "token" in name  # never echo a token, even a malformed one
        shown = "" if isinstance(given, dict) or secret else f" = {given!r}"
        lines.append(f"{name}{shown}: {error['msg']}")
    return "invalid server settings:\n  " + "\n  ".join(lines)
