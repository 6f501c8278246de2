"""The fedrot-server entry point: bad settings exit 2, SIGTERM stops gracefully, a finished
run exits 0 once every client heard DONE."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from fedrot_server.main import main, serve
from fedrot_server.service import FederationServer
from fedrot_server.state import RunPhase
from fedrot_server.store import open_reader
from wire import (
    WireClient,
    initializer_of,
    make_settings,
    synthetic_adapter,
    token_of,
    trained_of,
)


def test_bad_settings_exit_2(capsys) -> None:  # noqa: ANN001
    assert main(["--tokens", "alice=token-alice-0123456789", "--rounds", "0"]) == 2
    assert "rounds = '0'" in capsys.readouterr().err


def test_sigterm_stops_the_server_gracefully(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice", "bob"])

    async def scenario() -> tuple[int, str]:
        started: asyncio.Future[FederationServer] = asyncio.get_running_loop().create_future()
        serving = asyncio.ensure_future(
            serve(settings, initializer=initializer_of(synthetic_adapter()), started=started)
        )
        server = await started
        client = WireClient(server.address, token_of("alice"))
        await client.enroll()
        await client.close()
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(serving, 30), server.spec.run_id

    code, run_id = asyncio.run(scenario())
    assert code == 0
    reader = open_reader(settings.database_path)
    assert reader.run(run_id).phase is RunPhase.STOPPED
    reader.close()


def test_a_finished_run_exits_0_after_telling_every_client(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"], rounds=1, linger_s=30.0)

    async def scenario() -> int:
        started: asyncio.Future[FederationServer] = asyncio.get_running_loop().create_future()
        serving = asyncio.ensure_future(
            serve(settings, initializer=initializer_of(synthetic_adapter()), started=started)
        )
        server = await started
        client = WireClient(server.address, token_of("alice"))
        await client.enroll()
        task = (await client.get_task()).train
        payload = await client.download(task.round)
        await client.upload(task.round, payload, trained_of(task))
        assert (await client.get_task()).WhichOneof("task") == "done"
        code = await asyncio.wait_for(serving, 30)
        await client.close()
        return code

    assert asyncio.run(scenario()) == 0

