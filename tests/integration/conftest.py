"""Fixtures of the integration tests: a server starter, client processes, held-out data."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedrot_server.settings import ServerSettings
from harness import Clients, ServerThread, held_out

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    held_out(folder)
    return folder


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """``start_server(settings, evaluate=True)``; every server started is stopped after."""
    servers: list[ServerThread] = []

    def start(settings: ServerSettings, *, evaluate: bool = True) -> ServerThread:
        servers.append(ServerThread(settings, evaluate=evaluate))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[Clients]:
    started = Clients(tmp_path / "clients")
    yield started
    started.stop()
