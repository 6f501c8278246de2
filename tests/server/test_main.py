"""The fedrot-server entry point: bad settings exit 2, SIGTERM stops gracefully (the run stays
resumable), a finished run exits 0 once every client heard DONE."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

from fedrot.adapters import Adapter
from fedrot_server.main import main, serve
from fedrot_server.service import FederationServer
from fedrot_server.storage.state import RunPhase
from fedrot_server.storage.store import open_reader
from wire import (
    WireClient,
    adapter_of,
    assert_same,
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
    assert reader.run(run_id).phase is RunPhase.WAITING  # resumable: the next start takes it up
    assert reader.latest_unfinished_run().run_id == run_id
    reader.close()


def serve_one_client_round(settings, evaluate):  # noqa: ANN001, ANN201
    """Serve ``settings`` with ``evaluate``; alice trains the one round and hears DONE.
    Returns the server's exit status, the run id and alice's upload."""

    async def scenario():  # noqa: ANN202
        started: asyncio.Future[FederationServer] = asyncio.get_running_loop().create_future()
        serving = asyncio.ensure_future(serve(
            settings, initializer=initializer_of(synthetic_adapter()), evaluator=evaluate,
            started=started,
        ))  # fmt: skip
        server = await started
        client = WireClient(server.address, token_of("alice"))
        await client.enroll()
        task = (await client.get_task()).train
        payload = await client.download(task.round)
        await client.upload(task.round, payload, trained_of(task))
        assert (await client.get_task()).WhichOneof("task") == "done"
        code = await asyncio.wait_for(serving, 30)
        await client.close()
        return code, server.spec.run_id, adapter_of(payload)

    return asyncio.run(scenario())


def test_a_finished_run_exits_0_after_telling_every_client(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"], rounds=1, linger_s=30.0)
    evaluated: list[tuple[str, Adapter]] = []

    def evaluate(adapter: Adapter) -> dict[str, float]:
        evaluated.append((threading.current_thread().name, adapter))
        return {"accuracy": 0.75}

    code, run_id, uploaded = serve_one_client_round(settings, evaluate)
    assert code == 0
    ((thread, adapter),) = evaluated
    assert thread.startswith("fedrot-evaluation")  # its own thread, off the rounds
    assert_same(adapter, uploaded)  # one client: the aggregate is its update
    reader = open_reader(settings.database_path)
    assert [(m.source, m.name, m.value) for m in reader.metrics(run_id) if m.source == "server"] == [
        ("server", "accuracy", 0.75)
    ]
    assert reader.rounds(run_id)[0].summary["evaluation"] == {"accuracy": 0.75}
    assert reader.run(run_id).phase is RunPhase.FINISHED
    reader.close()



def test_a_failing_evaluation_leaves_the_round_without_metrics(tmp_path: Path) -> None:
    """A held-out set the evaluator cannot score (e.g. chats without a chat template) is logged,
    and the run goes on: it used to fail the run at round 0's close, and every resume."""
    settings = make_settings(tmp_path, ["alice"], rounds=1, linger_s=0.0)

    def evaluate(adapter: Adapter) -> dict[str, float]:
        raise ValueError("max_length=8 leaves no completion token to score")

    code, run_id, _ = serve_one_client_round(settings, evaluate)
    assert code == 0
    reader = open_reader(settings.database_path)
    assert reader.rounds(run_id)[0].summary["evaluation"] == {}
    assert reader.run(run_id).phase is RunPhase.FINISHED
    reader.close()
