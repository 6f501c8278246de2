"""Malformed, inconsistent or misplaced uploads get the right status and change nothing."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

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
Messages = list[pb.UploadUpdateRequest]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def header(run_id: str, payload: bytes, **overrides: object) -> pb.UploadUpdateRequest:
    fields: dict = {"sample_count": 10, "metrics": {"train_loss": 0.5}, **overrides}
    return upload_header(run_id, 0, payload, BOTH, **fields)


def good_then(payload: bytes, run_id: str, **overrides: object) -> Messages:
    return [header(run_id, payload, **overrides), *chunk_messages(payload, 512)]


def with_tensor(update: dict, key_end: str, tensor_of: Callable) -> bytes:  # noqa: ANN001
    changed = dict(update)
    key = next(k for k in changed if k.endswith(key_end))
    changed[key] = tensor_of(changed[key])
    return encode_update(changed)


def nan_at_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def bad_uploads(run_id: str, good: bytes, update: dict) -> dict[str, tuple[Messages, grpc.StatusCode]]:
    """name -> (messages, expected status)."""
    garbage = b"\x07" * 300
    truncated = good[:-16]
    nan = with_tensor(update, "0.query.lora_A.weight", nan_at_first)
    inf = with_tensor(update, "classifier.bias", lambda t: t + float("inf"))
    rank3 = with_tensor(update, "0.value.lora_A.weight", lambda t: torch.zeros(3, t.shape[1]))
    float64 = with_tensor(update, "1.query.lora_B.weight", lambda t: t.double())
    missing = encode_update({k: v for k, v in update.items() if not k.endswith("classifier.weight")})
    chunks = chunk_messages(good, 256)
    return {
        "garbage": (good_then(garbage, run_id), INVALID),
        "truncated": (good_then(truncated, run_id), INVALID),
        "nan": (good_then(nan, run_id), INVALID),
        "inf": (good_then(inf, run_id), INVALID),
        "wrong-shape": (good_then(rank3, run_id), INVALID),
        "float64": (good_then(float64, run_id), INVALID),
        "missing-key": (good_then(missing, run_id), INVALID),
        "wrong-sha": (good_then(good, run_id, sha256=hashlib.sha256(b"x").hexdigest()), INVALID),
        "sha-not-hex": (good_then(good, run_id, sha256="XYZ"), INVALID),
        "wrong-round": (good_then(good, run_id, round=1), grpc.StatusCode.FAILED_PRECONDITION),
        "wrong-run": (good_then(good, "run-nope"), grpc.StatusCode.FAILED_PRECONDITION),
        "too-large": (good_then(good, run_id, total_size=2 * MIB), grpc.StatusCode.RESOURCE_EXHAUSTED),
        "short-stream": (good_then(good, run_id, total_size=len(good) + 1), INVALID),
        "long-stream": (good_then(good, run_id, total_size=len(good) - 1), INVALID),
        "out-of-order": ([header(run_id, good), chunks[0], chunks[2], chunks[1], *chunks[3:]],
                         INVALID),
        "not-from-zero": ([header(run_id, good), *chunks[1:]], grpc.StatusCode.OUT_OF_RANGE),
        "no-header": (chunks, INVALID),
        "two-headers": ([header(run_id, good), header(run_id, good), *chunks], INVALID),
        "empty-stream": ([], INVALID),
        "wrong-factors": (good_then(good, run_id, factors=[pb.FACTOR_B]), INVALID),
        "unspecified-factor": (good_then(good, run_id, factors=[pb.FACTOR_UNSPECIFIED]), INVALID),
        "zero-samples": (good_then(good, run_id, sample_count=0), INVALID),
        "nan-metric": (good_then(good, run_id, metrics={"loss": float("nan")}), INVALID),
        "no-key": (good_then(good, run_id, idempotency_key=""), INVALID),
    }


def test_bad_uploads_are_refused_and_change_nothing(tmp_path: Path) -> None:
    initial = synthetic_adapter()
    settings = make_settings(tmp_path, ["alice", "bob"], rounds=1, max_upload_bytes=MIB)

    async def scenario() -> None:
        async with running_server(settings, initial) as server:
            alice = WireClient(server.address, token_of("alice"))
            bob = WireClient(server.address, token_of("bob"))
            await asyncio.gather(alice.enroll(), bob.enroll())
            for client in (alice, bob):
                assert (await client.get_task()).WhichOneof("task") == "train"
            reference = adapter_of(await alice.download(0))
            update = local_update(reference, BOTH, seed=1)
            good = encode_update(update)
            run_id = server.spec.run_id
            for name, (messages, code) in bad_uploads(run_id, good, update).items():
                with pytest.raises(grpc.aio.AioRpcError) as call:
                    await alice.upload_messages(messages)
                assert call.value.code() is code, (name, call.value.details())
                assert call.value.details(), name
                assert server.store.uploads(run_id, 0) == [], name
                assert (await alice.heartbeat(0)).round_open, name
            assert not (server.settings.state_dir / "runs" / run_id / "rounds" / "0" / "uploads").exists()

            accepted = await alice.upload_messages(good_then(good, run_id, idempotency_key="k1"))
            assert accepted.status == pb.UPLOAD_STATUS_ACCEPTED
            replay = await alice.upload_messages(good_then(good, run_id, idempotency_key="k1"))
            assert replay.status == pb.UPLOAD_STATUS_DUPLICATE
            assert replay.bytes_received == len(good)
            with pytest.raises(grpc.aio.AioRpcError) as call:
                await alice.upload_messages(good_then(good, run_id, idempotency_key="k2"))
            assert call.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert len(server.store.uploads(run_id, 0)) == 1

            bob_update = encode_update(local_update(reference, BOTH, seed=2))
            await bob.upload(0, bob_update, BOTH, sample_count=30)
            done = await alice.get_task()
            assert done.WhichOneof("task") == "done"
            final = adapter_of(await alice.download(1))
            expected = core_aggregate("fedrot", 0, initial, [("alice", good, 10), ("bob", bob_update, 30)])
            assert_same(final, expected)

            with pytest.raises(grpc.aio.AioRpcError) as call:
                await bob.upload(0, bob_update, BOTH, key="late")
            assert call.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            for client in (alice, bob):
                await client.close()

    asyncio.run(scenario())


def test_downloads_of_other_rounds_and_bad_offsets_are_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"], rounds=1)

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            alice = WireClient(server.address, token_of("alice"))
            await alice.enroll()
            whole = await alice.download(0)
            header, chunks = await alice.download_parts(0, offset=100)
            assert header.total_size == len(whole)
            assert chunks[0].offset == 100 and b"".join(c.data for c in chunks) == whole[100:]
            for round_index, offset, code in [
                (1, 0, grpc.StatusCode.NOT_FOUND),
                (0, len(whole) + 1, grpc.StatusCode.INVALID_ARGUMENT),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as call:
                    await alice.download_parts(round_index, offset=offset)
                assert call.value.code() is code
            await alice.close()

    asyncio.run(scenario())
