"""A live federation for the dashboard tests: a real server (tiny synthetic adapter, dashboard
on 127.0.0.1 port 0) on its own event loop thread, and fake clients over real gRPC.

Importable as ``live_federation`` (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx

from fedrot.adapters import Adapter
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.service import FederationServer, start_server
from fedrot_server.settings import ServerSettings
from wire import (
    WireClient,
    adapter_of,
    encode_update,
    initializer_of,
    local_update,
    make_settings,
    synthetic_adapter,
    token_of,
    trained_of,
)

T = TypeVar("T")
ADMIN = "admin-token-for-tests-0123"
CLIENTS = ("alice", "bob", "carol")


def live_settings(tmp_path: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {"dashboard_listen": "127.0.0.1:0", "admin_token": ADMIN,
                              "round_deadline_s": 120.0, "linger_s": 0.0}  # fmt: skip
    values.update(overrides)
    return make_settings(tmp_path, CLIENTS, **values)


def held_out_score(adapter: Adapter) -> Mapping[str, float]:
    """A stand-in evaluator: a number in (0, 1) that moves with the adapter (not a model)."""
    norm = sum(float(p.B.norm()) for p in adapter.lora.values())
    return {"accuracy": norm / (1.0 + norm)}


class LiveServer:
    """A started server on its own loop thread; ``call`` runs a coroutine there."""

    def __init__(self, settings: ServerSettings, evaluate: bool = True) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="dashboard-test-server")  # fmt: skip
        self._thread.start()
        self.server: FederationServer = self.call(start_server(
            settings, initializer=initializer_of(synthetic_adapter()),
            evaluator=held_out_score if evaluate else None))  # fmt: skip
        assert self.server.dashboard_port, "the dashboard did not start"
        self.url = f"http://127.0.0.1:{self.server.dashboard_port}"

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self) -> None:
        try:
            self.call(self.server.stop(grace_s=0.5))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll ``condition`` until it holds; AssertionError naming ``what`` after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def get(server: LiveServer, path: str, **kwargs: Any) -> Any:
    response = httpx.get(server.url + path, timeout=30.0, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


async def train_and_upload(client: WireClient, task: pb.TrainTask, index: int, loss: float) -> None:
    """Download the round's adapter, fake a local update, upload it."""
    payload = await client.download(task.round)
    update = encode_update(local_update(adapter_of(payload), trained_of(task), seed=31 * task.round + index))
    result = await client.upload(task.round, update, trained_of(task), sample_count=10 + 5 * index,
                                 metrics={"train_loss": loss})  # fmt: skip
    assert result.status == pb.UPLOAD_STATUS_ACCEPTED


async def participate(client: WireClient, index: int) -> int:
    """Enrol, then train and upload every round until DONE; the rounds completed."""
    await client.enroll(host=f"test-{index}")
    while True:
        response = await client.get_task(max_wait_s=2.0)
        kind = response.WhichOneof("task")
        if kind == "done":
            return response.done.rounds_completed
        if kind == "train":
            loss = 1.5 / (1 + response.train.round) + 0.1 * index
            await train_and_upload(client, response.train, index, loss)


async def refused_upload(client: WireClient) -> grpc.StatusCode:
    """An upload for a round that does not exist: refused, recorded as such."""
    update = encode_update(synthetic_adapter().to_state_dict())
    try:
        await client.upload(99, update, [])
    except grpc.aio.AioRpcError as error:
        return error.code()
    raise AssertionError("the upload was accepted")


async def make_clients(address: str, names: tuple[str, ...] = CLIENTS) -> list[WireClient]:
    """Clients with their channels (made on the loop that uses them)."""
    return [WireClient(address, token_of(name)) for name in names]


async def close_clients(clients: list[WireClient]) -> None:
    for client in clients:
        await client.close()
