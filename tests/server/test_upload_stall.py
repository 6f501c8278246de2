"""An upload that stops sending chunks is abandoned after ``upload_stall_s`` (DEADLINE_EXCEEDED)
and gives the client's slot back; the same update sent again is accepted once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from fedrot_proto.v1 import federation_pb2 as pb
from wire import (
    WireClient,
    chunk_messages,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    trained_of,
    upload_header,
)


def test_a_stalled_upload_is_abandoned_and_its_retry_accepted(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"], rounds=1, upload_stall_s=0.3)

    async def scenario() -> tuple[grpc.StatusCode, str, int, int]:
        async with running_server(settings, synthetic_adapter()) as server:
            client = WireClient(server.address, token_of("alice"))
            await client.enroll()
            task = (await client.get_task()).train
            update = await client.update_for(task, seed=1)
            header = upload_header(client.run_id, task.round, update, trained_of(task),
                                   sample_count=5, metrics={}, key="key-1")  # fmt: skip
            chunks = chunk_messages(update, 256)
            never = asyncio.Event()

            async def stalling() -> AsyncIterator[pb.UploadUpdateRequest]:
                yield header
                yield chunks[0]
                await never.wait()  # the link went silent

            call = client.stub.UploadUpdate(stalling(), metadata=client.metadata)
            try:
                await call
            except grpc.aio.AioRpcError as error:
                code, details = error.code(), error.details()
            finally:
                never.set()
            reply = await client.upload_messages([header, *chunks])
            replay = await client.upload_messages([header, *chunks])
            rows = server.store.uploads(server.spec.run_id, 0)
            await client.close()
            assert replay.status == pb.UPLOAD_STATUS_DUPLICATE
            return code, details, reply.status, len(rows)

    code, details, status, rows = asyncio.run(scenario())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no message for 0.3s" in details
    assert status == pb.UPLOAD_STATUS_ACCEPTED and rows == 1


def test_a_stream_that_never_sends_its_header_is_abandoned(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"], rounds=1, upload_stall_s=0.3)

    async def scenario() -> list[grpc.StatusCode]:
        async with running_server(settings, synthetic_adapter()) as server:
            client = WireClient(server.address, token_of("alice"))
            await client.enroll()
            never = asyncio.Event()

            async def silent() -> AsyncIterator[pb.UploadUpdateRequest]:
                await never.wait()
                yield pb.UploadUpdateRequest()  # never reached

            calls = [client.stub.UploadUpdate(silent(), metadata=client.metadata)
                     for _ in range(5)]  # fmt: skip
            codes = []
            for call in calls:
                try:
                    await asyncio.wait_for(call, 10)
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code())
            never.set()
            await client.close()
            return codes

    codes = asyncio.run(scenario())
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 5
