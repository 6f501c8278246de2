"""Fields the protocol cannot mean are INVALID_ARGUMENT, with a message naming the field, and
leave the server's state as it was: an upload header listing a factor twice, a heartbeat whose
phase is no ``ClientPhase`` value, or whose progress is no fraction in [0, 1]. Real gRPC on
loopback, port 0."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import grpc
import pytest

from fedrot_proto.v1 import federation_pb2 as pb
from server_state import snapshot
from wire import (
    FACTOR_NUMBERS,
    WireClient,
    chunk_messages,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    trained_of,
    upload_header,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_HEARTBEATS = {
    "unknown phase": (99, 0.5, "heartbeat phase 99 is not a ClientPhase value"),
    "NaN progress": (pb.CLIENT_PHASE_TRAINING, math.nan,
                     "progress must be a fraction in [0, 1], got nan"),
    "infinite progress": (pb.CLIENT_PHASE_TRAINING, math.inf, "got inf"),
    "negative progress": (pb.CLIENT_PHASE_TRAINING, -0.1, "got -0.1"),
    "progress above 1": (pb.CLIENT_PHASE_UPLOADING, 1.5, "got 1.5"),
    "withdrawal with NaN progress": (pb.CLIENT_PHASE_WITHDRAWN, math.nan, "got nan"),
}  # fmt: skip


def test_a_factor_listed_twice_is_invalid(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"], min_clients=1, rounds=1)

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            alice = WireClient(server.address, token_of("alice"))
            await alice.enroll()
            task = (await alice.get_task()).train
            trained = trained_of(task)
            payload = await alice.update_for(task, seed=1)
            numbers = [FACTOR_NUMBERS[f] for f in sorted(trained)]
            twice = [numbers[0], *numbers]  # [A, A, B] (or [A, A]): the same set of factors
            header = upload_header(alice.run_id, 0, payload, trained, sample_count=10,
                                   metrics={}, factors=twice)  # fmt: skip
            before = snapshot(server)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await alice.upload_messages([header, *chunk_messages(payload, 256)])
            assert refused.value.code() is INVALID
            name = pb.Factor.Name(numbers[0])
            assert f"factors: {name} is listed twice" in refused.value.details()
            assert not before.differences(snapshot(server))
            reply = await alice.upload(0, payload, trained)
            assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
            await alice.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_heartbeats_with_an_unknown_phase_or_no_fraction_are_invalid(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice", "bob"], rounds=1)

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            alice, bob = (WireClient(server.address, token_of(n)) for n in ("alice", "bob"))
            await asyncio.gather(alice.enroll(), bob.enroll())
            await asyncio.gather(alice.get_task(), bob.get_task())
            before = snapshot(server)
            for case, (phase, progress, text) in BAD_HEARTBEATS.items():
                request = pb.HeartbeatRequest(run_id=alice.run_id, round=0, phase=phase,
                                              progress=progress)  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await alice.stub.Heartbeat(request, metadata=alice.metadata)
                assert refused.value.code() is INVALID, case
                assert text in refused.value.details(), (case, refused.value.details())
                assert not before.differences(snapshot(server)), case
            assert server.engine._round.withdrawn == set()  # noqa: SLF001 - not withdrawn
            valid = ((pb.CLIENT_PHASE_UNSPECIFIED, 0.0), (pb.CLIENT_PHASE_IDLE, 1.0))
            for phase, progress in valid:
                request = pb.HeartbeatRequest(run_id=alice.run_id, round=0, phase=phase,
                                              progress=progress)  # fmt: skip
                reply = await alice.stub.Heartbeat(request, metadata=alice.metadata)
                assert reply.round_open  # alice is still expected in round 0
            for client in (alice, bob):
                await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
