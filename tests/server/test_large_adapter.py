"""An adapter larger than gRPC's 4 MiB default message crosses the wire both ways in chunks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from fedrot.adapters import Factor
from fedrot_proto.v1 import federation_pb2 as pb
from wire import (
    MIB,
    WireClient,
    adapter_of,
    assert_same,
    chunk_messages,
    core_aggregate,
    encode_update,
    local_update,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    upload_header,
)

BOTH = frozenset({Factor.A, Factor.B})


def test_adapter_above_4_mib_travels_in_chunks(tmp_path: Path) -> None:
    # Head (1200, 1000) float32 = 4.8 MB, plus the LoRA factors.
    initial = synthetic_adapter(head=(1200, 1000), modules={"base_model.model.l.0.query": (1000, 1000)})
    settings = make_settings(tmp_path, ["alice", "bob"], rounds=1)

    async def scenario() -> None:
        async with running_server(settings, initial) as server:
            alice = WireClient(server.address, token_of("alice"))
            bob = WireClient(server.address, token_of("bob"))
            await asyncio.gather(alice.enroll(), bob.enroll())
            task = (await alice.get_task()).train
            assert task.global_adapter.size_bytes > 4 * MIB
            header, chunks = await alice.download_parts(0)
            assert header.total_size == task.global_adapter.size_bytes
            assert len(chunks) == -(-header.total_size // MIB)
            assert max(len(c.data) for c in chunks) == MIB
            reference = adapter_of(await alice.download(0))
            assert_same(reference, initial)

            update = encode_update(local_update(reference, BOTH, seed=5))
            run_id = server.spec.run_id
            oversized = [upload_header(run_id, 0, update, BOTH, sample_count=1, metrics={}),
                         *chunk_messages(update, 4 * MIB + 1)]  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as call:
                await alice.upload_messages(oversized)
            assert call.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            accepted = await alice.upload(0, update, BOTH, chunk_bytes=4 * MIB, sample_count=3)
            assert accepted.status == pb.UPLOAD_STATUS_ACCEPTED
            other = encode_update(local_update(reference, BOTH, seed=6))
            await bob.upload(0, other, BOTH, chunk_bytes=MIB, sample_count=1)
            assert (await bob.get_task()).WhichOneof("task") == "done"
            final = adapter_of(await bob.download(1))
            assert_same(final, core_aggregate("fedrot", 0, initial, [("alice", update, 3), ("bob", other, 1)]))
            for client in (alice, bob):
                await client.close()

    asyncio.run(scenario())
