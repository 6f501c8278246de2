"""Opening federations: :func:`connect` (one run), :func:`runs` (one federation per run of a
standing server) and the transport they use."""

from __future__ import annotations

import platform
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from fedrot_client.enrolment import PastRuns
from fedrot_client.federation import Federation
from fedrot_client.following import follow_runs
from fedrot_client.settings import ConnectionSettings, connection_settings
from fedrot_client.transport import RetryPolicy, Transport

SOFTWARE = "fedrot-client 0.1.0"


def connect(
    server: str | None = None,
    *,
    token: str | None = None,
    state_dir: str | Path | None = None,
    info: Mapping[str, str] | None = None,
    handle_signals: bool = True,
    **settings: object,
) -> Federation:
    """A :class:`Federation` with the server at ``server`` (``host:port``), to use in a
    ``with`` block. ``settings`` are the daemon's connection flags as keywords: ``token_file``,
    ``tls``, ``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``, ``tls_server_name``, ``model``
    (a local copy of the base model), ``device``, ``max_wait_s``, ``rpc_timeout_s``,
    ``transfer_timeout_s``, ``backoff_*``, ``reconnect_timeout_s``. Whatever is not given comes
    from the ``FEDROT_CLIENT_*`` environment, then the defaults. Bad values raise
    :class:`~fedrot_client.settings.SettingsError` naming each one.
    """
    given = {"server": server, "token": token, "state_dir": state_dir, **settings}
    checked = connection_settings(**{k: v for k, v in given.items() if v is not None})
    stop = threading.Event()
    transport = open_transport(checked, stop)
    facts = {**describe_host(checked.device), **(info or {})}
    return Federation(checked, transport, stop=stop, info=facts, owns_transport=True,
                      handle_signals=handle_signals)  # fmt: skip


def runs(
    server: str | None = None,
    *,
    token: str | None = None,
    state_dir: str | Path | None = None,
    info: Mapping[str, str] | None = None,
    handle_signals: bool = True,
    one_run: bool = False,
    **settings: object,
) -> Iterator[Federation]:
    """One :class:`Federation` per run of the server at ``server``, for as long as it serves
    runs this client takes part in: use each in a ``with`` block, as :func:`connect`'s::

        for fed in fedrot_client.runs("server:50051", token="...", state_dir="state"):
            with fed:
                ...  # build the model, go through fed.tasks(), save the final adapter

    The next federation comes once a run ended and the server said it continues (a standing
    server), or after :meth:`Federation.decline`; entering it waits for the next run. The
    iteration ends after a run that ends the server, after a stop, or after the first run when
    ``one_run``. The arguments are :func:`connect`'s; the settings are checked here, at once.
    """
    given = {"server": server, "token": token, "state_dir": state_dir, **settings}
    checked = connection_settings(**{k: v for k, v in given.items() if v is not None})
    return _follow(checked, {**describe_host(checked.device), **(info or {})},
                   handle_signals=handle_signals, one_run=one_run)  # fmt: skip


def _follow(settings: ConnectionSettings, info: Mapping[str, str], *, handle_signals: bool,
            one_run: bool) -> Iterator[Federation]:  # fmt: skip
    stop = threading.Event()
    transport = open_transport(settings, stop)

    def open_federation(past: PastRuns) -> Federation:
        return Federation(settings, transport, stop=stop, info=info, past=past,
                          handle_signals=handle_signals, following=True)  # fmt: skip

    try:
        yield from follow_runs(open_federation, one_run=one_run)
    finally:
        transport.close()


def open_transport(settings: ConnectionSettings, stop: threading.Event) -> Transport:
    """The gRPC transport ``settings`` describe (retries, TLS, timeouts)."""
    policy = RetryPolicy(
        initial_s=settings.backoff_initial_s,
        max_s=settings.backoff_max_s,
        multiplier=settings.backoff_multiplier,
        give_up_after_s=settings.reconnect_timeout_s or None,
    )
    return Transport(
        settings.server,
        settings.read_token(),
        policy=policy,
        stop=stop,
        tls=settings.tls_config(),
        rpc_timeout_s=settings.rpc_timeout_s,
        transfer_timeout_s=settings.transfer_timeout_s,
    )


def describe_host(device: str) -> dict[str, str]:
    """What the client tells the server about itself at enrolment (logged, stored)."""
    return {"hostname": socket.gethostname(), "software": SOFTWARE,
            "python": platform.python_version(), "torch": torch.__version__,
            "device": device}  # fmt: skip
