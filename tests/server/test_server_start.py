"""A start that fails leaves nothing behind: a second server on a taken gRPC port fails its
start (gRPC's default SO_REUSEPORT would have let it bind and split the clients with the
first), and the dashboard it had started is stopped and the state folder is free again."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from fedrot_server.errors import SettingsError
from fedrot_server.service import start_server
from wire import (
    WireClient,
    initializer_of,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_a_second_server_on_a_taken_port_fails_its_start_and_frees_what_it_opened(
    tmp_path: Path,
) -> None:
    first = make_settings(tmp_path / "first", ["alice"], rounds=1)
    dashboard_port = free_port()

    async def scenario() -> bool:
        async with running_server(first, synthetic_adapter()) as server:
            second = make_settings(tmp_path / "second", ["alice"], rounds=1,
                                   listen=f"127.0.0.1:{server.port}",
                                   dashboard_listen=f"127.0.0.1:{dashboard_port}")  # fmt: skip
            with pytest.raises(SettingsError, match=rf"listen = '127\.0\.0\.1:{server.port}': "
                                                    "cannot bind"):  # fmt: skip
                await start_server(second, initializer=initializer_of(synthetic_adapter()))
            assert bindable(dashboard_port)  # the second's dashboard was stopped
            moved = second.model_copy(update={"listen": "127.0.0.1:0"})
            again = await start_server(moved, initializer=initializer_of(synthetic_adapter()))
            await again.stop(grace_s=0.1)  # its state folder was released
            alice = WireClient(server.address, token_of("alice"))
            run_id = (await alice.enroll()).run.run_id  # the first still serves its clients
            await alice.close()
            return run_id == server.spec.run_id

    assert asyncio.run(scenario())
