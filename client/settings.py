"""The client daemon's one typed settings object.

Sources, highest priority first: command-line flags (``--server 10.0.0.5:50051``,
``--data shard.jsonl``), environment variables (``FEDROT_CLIENT_SERVER``, ``FEDROT_CLIENT_TOKEN``,
...), then the defaults below. :func:`load_settings` validates everything at start and raises
:class:`SettingsError` naming each bad setting and its value.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedrot.errors import FedRotError
from fedrot_client.data import FieldNames, LabelVocabulary
from fedrot_client.transport import TlsConfig

ENV_PREFIX = "FEDROT_CLIENT_"


class SettingsError(FedRotError, ValueError):
    """A setting is invalid; the message names each bad setting and its value."""


class ConnectionSettings(BaseSettings):
    """How one client reaches its federation: the server, the token, TLS, the state folder,
    the local base model and device, timeouts and backoff. What :func:`fedrot_client.connect`
    takes; the daemon's :class:`ClientSettings` adds its data and training. Every setting is
    also an environment variable: FEDROT_CLIENT_ and the name in capitals."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        cli_prog_name="fedrot-client",
        cli_kebab_case=True,
        cli_implicit_flags=True,
    )
    FILE_SETTINGS: ClassVar[tuple[str, ...]] = (
        "token_file", "tls_ca_file", "tls_cert_file", "tls_key_file"
    )

    server: str = Field("127.0.0.1:50051", description="host:port of the fedrot-server")
    token: SecretStr | None = Field(None, description="enrolment token (or --token-file)")
    token_file: Path | None = Field(None, description="file whose first line is the token")
    tls: bool = Field(
        False,
        description="use TLS with the system's root certificates (default: plaintext, for "
        "loopback/VPN; any tls_* setting turns TLS on too)",
    )
    tls_ca_file: Path | None = Field(
        None, description="PEM root certificates to trust instead of the system's: use TLS"
    )
    tls_cert_file: Path | None = Field(None, description="PEM client certificate (mutual TLS)")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_server_name: str | None = Field(
        None, min_length=1, description="name the server's certificate must carry (default: host)"
    )
    model: str | None = Field(
        None, description="local base model (registry name or folder); default: the run's"
    )
    state_dir: Path = Field(Path("fedrot-client-state"), description="client id, rounds done")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    load_in_4bit: bool = Field(
        False, description="QLoRA: the base model's weights in 4 bits (bitsandbytes, CUDA only; "
        "model must be a folder of plain weights)"
    )
    max_wait_s: float = Field(30.0, gt=0, description="long-poll length of one GetTask")
    rpc_timeout_s: float = Field(60.0, gt=0, description="deadline of one unary call")
    transfer_timeout_s: float = Field(
        120.0, gt=0, description="a transfer with no progress for this long is cut and resumed"
    )
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    backoff_multiplier: float = Field(2.0, ge=1)
    reconnect_timeout_s: float = Field(
        600.0, ge=0, description="give up when the server is away this long (0: never)"
    )

    @field_validator("server")
    @classmethod
    def _check_server(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"server must be host:port with port 1..65535, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> ConnectionSettings:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give exactly one of token and token_file")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s {self.backoff_max_s} is below backoff_initial_s "
                f"{self.backoff_initial_s}"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give both tls_cert_file and tls_key_file, or neither")
        for name in self.FILE_SETTINGS:
            path = getattr(self, name)
            if path is not None and not path.exists():
                raise ValueError(f"{name} {str(path)!r} does not exist")
        return self

    def read_token(self) -> str:
        """The enrolment token, from ``token`` or the first line of ``token_file``."""
        if self.token is not None:
            return self.token.get_secret_value().strip()
        assert self.token_file is not None
        lines = self.token_file.read_text().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise SettingsError(f"token_file {self.token_file}: empty")
        return token

    def tls_config(self) -> TlsConfig | None:
        """TLS when ``tls`` is on or any ``tls_*`` setting is given (the system's roots
        without ``tls_ca_file``)."""
        files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if not self.tls and all(f is None for f in files) and self.tls_server_name is None:
            return None
        ca, cert, key = (None if f is None else f.read_bytes() for f in files)
        return TlsConfig(ca, cert, key, self.tls_server_name)


class ClientSettings(ConnectionSettings):
    """Everything one ``fedrot-client`` process needs: the connection, plus its data and how
    it trains; the run itself comes from the server. Every flag is also an environment
    variable: FEDROT_CLIENT_ and the name in capitals (--max-wait-s is FEDROT_CLIENT_MAX_WAIT_S)."""

    FILE_SETTINGS: ClassVar[tuple[str, ...]] = (
        *ConnectionSettings.FILE_SETTINGS, "data", "labels", "chat_template"
    )

    data: Path = Field(description="training data: .jsonl, .csv/.tsv or a saved HF dataset")
    data_split: str | None = Field(None, description="split of a saved DatasetDict")
    text_field: str = Field("text", min_length=1)
    label_field: str = Field("label", min_length=1)
    labels: Path | None = Field(
        None, description="JSON list of the data's label names in id order (default: the run's "
        "label names, else integer labels); a run naming other classes is declined"
    )
    chat_template: Path | None = Field(
        None, description="Jinja chat template for chat data (default: the tokenizer's own)"
    )
    final_adapter_dir: Path | None = Field(
        None, description="save each run's final adapter as a PEFT folder: here, or in a "
        "subfolder per run id while following a standing server's runs"
    )
    one_run: bool = Field(
        False, description="leave after one run (default: stay connected to a standing server "
        "and join its next runs)"
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads")
    progress: bool = Field(True, description="training progress bar (only ever on a tty)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def field_names(self, classification: bool) -> FieldNames:
        """Which data fields hold the text and (for classification) the label."""
        return FieldNames(self.text_field, self.label_field if classification else None)

    def label_vocabulary(self, num_labels: int) -> LabelVocabulary:
        """The label names of ``labels`` (checked against the run's ``num_labels``), or ids;
        for a run that names no classes."""
        vocabulary = self.given_labels()
        if vocabulary is None:
            return LabelVocabulary.of_size(num_labels)
        if len(vocabulary) != num_labels:
            raise SettingsError(
                f"labels {self.labels}: expected a list of {num_labels} names (the run's "
                f"num_labels), got {len(vocabulary)}"
            )
        return vocabulary

    def given_labels(self) -> LabelVocabulary | None:
        """The label names of the ``labels`` file in id order, or None when none is given."""
        if self.labels is None:
            return None
        try:
            names = json.loads(self.labels.read_text())
        except (OSError, ValueError) as exc:
            raise SettingsError(f"labels {self.labels}: not a readable JSON list: {exc}") from exc
        if not isinstance(names, list):
            raise SettingsError(f"labels {self.labels}: expected a JSON list of names, got "
                                f"{type(names).__name__}")  # fmt: skip
        try:
            return LabelVocabulary(tuple(str(n) for n in names))
        except ValueError as exc:
            raise SettingsError(f"labels {self.labels}: {exc}") from None

    def show_progress(self) -> bool:
        """The progress bar: when asked for (the default) and stderr is a terminal."""
        return self.progress and sys.stderr.isatty()


def load_settings(argv: Sequence[str] = ()) -> ClientSettings:
    """Settings from the flags ``argv`` and the ``FEDROT_CLIENT_*`` environment, validated."""
    try:
        return ClientSettings(_cli_parse_args=list(argv))
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from exc


def describe_errors(exc: ValidationError) -> str:
    """One line per bad setting: its name, the value given and what is wrong."""
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        given = error.get("input")
        shown = "" if isinstance(given, dict) else f" = {given!r}"
        lines.append(f"{name}{shown}: {error['msg']}")
    return "invalid client settings:\n  " + "\n  ".join(lines)


def connection_settings(**values: object) -> ConnectionSettings:
    """Connection settings from keyword values and the ``FEDROT_CLIENT_*`` environment (values
    given here win), validated like the daemon's flags."""
    try:
        return ConnectionSettings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from exc
