"""An upload stream that breaks off after its header was accepted is an interruption, not a
refusal: the link is cut (a proxy aborts the connection), the client goes silent (the server
abandons the stream as stalled), cancels its call, or ends the stream before the announced size.
The server holds the bytes for a resume, records the stream in the ``interruptions`` telemetry
table (none in ``refusals``), and the dashboard shows the client's last upload as interrupted,
resumable, with its own Prometheus counter."""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient

from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.dashboard import create_app
from fedrot_server.service import FederationServer
from fedrot_server.settings import ServerSettings
from fedrot_server.storage.store import open_reader
from fedrot_server.storage.telemetry import open_telemetry_reader
from fedrot_server.rpc.transfers import PayloadReceiver
from wire import (
    WireClient,
    adapter_of,
    chunk_messages,
    encode_update,
    local_update,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    trained_of,
    upload_header,
)

INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
if str(INTEGRATION) not in sys.path:
    sys.path.append(str(INTEGRATION))

from cutting_proxy import CuttingProxy  # noqa: E402

CHUNK = 256
HELD_CHUNKS = 2  # chunks the server takes before the stream breaks off
WAIT_S = 20.0  # a bound on every wait, so a broken test fails instead of hanging
WAYS = ["network cut", "stall", "cancel", "short stream"]


class ChunkWatch:
    """Counts the chunks server-side receivers take; runs ``on_held`` at the HELD_CHUNKS-th."""

    def __init__(self) -> None:
        self.taken = 0
        self.held = asyncio.Event()
        self.on_held = lambda: None


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChunkWatch]:
    found = ChunkWatch()
    add = PayloadReceiver.add

    def spy(self: PayloadReceiver, offset: int, data: bytes) -> None:
        add(self, offset, data)
        found.taken += 1
        if found.taken == HELD_CHUNKS:
            found.on_held()
            found.held.set()

    monkeypatch.setattr(PayloadReceiver, "add", spy)
    yield found


async def break_off(server: FederationServer, how: str, watch: ChunkWatch) -> tuple[bytes, str]:
    """alice sends her header and HELD_CHUNKS chunks of her update, then the stream breaks off
    ``how``; returns the update and the gRPC status her call ended with."""
    proxy = CuttingProxy(server.port) if how == "network cut" else None
    direct = WireClient(server.address, token_of("alice"))
    alice = WireClient(proxy.address, token_of("alice")) if proxy else direct
    try:
        await direct.enroll()
        alice.run_id = direct.run_id
        task = (await direct.get_task()).train
        payload = encode_update(local_update(adapter_of(await direct.download(0)),
                                             trained_of(task), seed=1))  # fmt: skip
        assert len(payload) > (HELD_CHUNKS + 2) * CHUNK
        header = upload_header(alice.run_id, 0, payload, trained_of(task), sample_count=10,
                               metrics={}, key="key-1")  # fmt: skip
        if proxy is not None:
            watch.on_held = proxy.cut
        code = await send_and_break(alice, header, chunk_messages(payload, CHUNK), how, watch)
        return payload, code
    finally:
        if proxy is not None:
            await alice.close()
            proxy.close()
        await direct.close()


async def send_and_break(
    alice: WireClient, header: pb.UploadUpdateRequest, chunks: list, how: str, watch: ChunkWatch
) -> str:
    silent = asyncio.Event()

    async def stream() -> AsyncIterator[pb.UploadUpdateRequest]:
        yield header
        for message in chunks[:HELD_CHUNKS]:
            yield message
        if how != "short stream":
            await silent.wait()

    call = alice.stub.UploadUpdate(stream(), metadata=alice.metadata)
    try:
        if how == "cancel":
            async with asyncio.timeout(WAIT_S):
                await watch.held.wait()
            call.cancel()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)) as broken:
            async with asyncio.timeout(WAIT_S):
                await call
    finally:
        silent.set()
    error = broken.value
    return error.code().name if isinstance(error, grpc.aio.AioRpcError) else "CANCELLED"


async def held_bytes(server: FederationServer, payload: bytes) -> int:
    """QueryUpload's answer (it waits until the broken stream gave its slot back)."""
    alice = WireClient(server.address, token_of("alice"), run_id=server.spec.run_id)
    request = pb.QueryUploadRequest(run_id=alice.run_id, round=0, idempotency_key="key-1",
                                    total_size=len(payload),
                                    sha256=hashlib.sha256(payload).hexdigest())  # fmt: skip
    try:
        return (await alice.stub.QueryUpload(request, metadata=alice.metadata)).bytes_received
    finally:
        await alice.close()


def dashboard_of(settings: ServerSettings) -> tuple[dict, str]:
    """alice as the dashboard's clients API shows her, and its Prometheus metrics."""
    database = settings.database_path
    reader, telemetry = open_reader(database), open_telemetry_reader(database)
    app = create_app(reader, telemetry=telemetry, runs_root=settings.state_dir / "runs")
    try:
        with TestClient(app) as client:
            clients = client.get("/api/v1/runs/current/clients").json()
            metrics = client.get("/metrics").text
    finally:
        reader.close()
        telemetry.close()
    return next(c for c in clients if c["name"] == "alice"), metrics


@pytest.mark.parametrize("how", WAYS)
def test_a_broken_off_upload_is_recorded_and_shown_as_interrupted(
    tmp_path: Path, watch: ChunkWatch, how: str
) -> None:
    settings = make_settings(tmp_path, ["alice"], min_clients=1, rounds=1, upload_stall_s=0.5)
    held = HELD_CHUNKS * CHUNK

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            payload, code = await break_off(server, how, watch)
            assert await held_bytes(server, payload) == held
            telemetry = server.telemetry
            assert telemetry is not None
            assert telemetry.refusals(server.spec.run_id) == [], code
            (row,) = telemetry.interruptions(server.spec.run_id)
            assert (row.client, row.round_index) == ("alice", 0)
            assert (row.bytes_held, row.total_size) == (held, len(payload))
            assert f"after {held} of {len(payload)} bytes (held for a resume" in row.detail

    asyncio.run(asyncio.wait_for(scenario(), 60))
    alice, metrics = dashboard_of(settings)
    assert alice["last_upload_interrupted"] and not alice["last_upload_refused"]
    assert alice["refusal_reason"] is None
    assert "held for a resume" in alice["interruption_detail"]
    assert re.search(r'^fedrot_interrupted_uploads_total\{run="run-\w+"\} 1\.0$', metrics, re.M)
    assert "fedrot_refused_uploads_total{" not in metrics


def test_a_refusal_after_the_header_is_still_a_refusal(tmp_path: Path) -> None:
    """A chunk out of order breaks no link: refused (INVALID_ARGUMENT), not interrupted."""
    settings = make_settings(tmp_path, ["alice"], min_clients=1, rounds=1)

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            alice = WireClient(server.address, token_of("alice"))
            await alice.enroll()
            task = (await alice.get_task()).train
            payload = await alice.update_for(task, seed=1)
            header = upload_header(alice.run_id, 0, payload, trained_of(task), sample_count=10,
                                   metrics={})  # fmt: skip
            chunks = chunk_messages(payload, CHUNK)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await alice.upload_messages([header, chunks[0], chunks[2], chunks[1]])
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert server.telemetry is not None
            assert server.telemetry.interruptions(server.spec.run_id) == []
            (row,) = server.telemetry.refusals(server.spec.run_id)
            assert row.reason == "INVALID_ARGUMENT" and "chunks must be in order" in row.detail
            await alice.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    alice, _ = dashboard_of(settings)
    assert alice["last_upload_refused"] and not alice["last_upload_interrupted"]
