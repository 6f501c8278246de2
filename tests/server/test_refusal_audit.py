"""The refusal audit: every malformed or misplaced request gets its status, a message that names
the problem, and leaves the server's whole state unchanged (SQLite rows, files, the open round,
the aggregator's running sums; see ``server_state.snapshot``).

The cases of ``test_refused_uploads.py`` are checked again here against the full snapshot and
for their messages, with the cases that module lacks: unexpected keys, integer dtypes, corrupt
header JSON, a header length beyond the bytes, empty and duplicate chunks, an oversized sample
count, and every identity (unknown, malformed, revoked, never enrolled, not a participant).
"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import grpc
import pytest
import torch

from fedrot.adapters import Factor
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_proto.v1 import federation_pb2_grpc as pb_grpc
from server_state import snapshot
from test_refused_uploads import bad_uploads, good_then, header, with_tensor
from wire import (
    MIB,
    WireClient,
    adapter_of,
    chunk_messages,
    encode_update,
    local_update,
    make_settings,
    running_server,
    send_upload,
    synthetic_adapter,
    token_of,
)

Code = grpc.StatusCode
INVALID = Code.INVALID_ARGUMENT
CLIENTS = ["alice", "bob", "carol", "mallory", "dave"]

# What the message of each case of ``test_refused_uploads.bad_uploads`` must say.
EARLIER_CASES = {
    "garbage": "unreadable safetensors", "truncated": "unreadable safetensors",
    "nan": "0.query.lora_A.weight: 1 non-finite", "inf": "classifier.bias: 3 non-finite",
    "wrong-shape": "(rank 3, expected rank 2)", "float64": "F64",
    "missing-key": "missing key base_model.model.classifier.weight",
    "wrong-sha": "sha256 mismatch", "sha-not-hex": "sha256 must be 64 lowercase hex",
    "wrong-round": "round 1 does not accept", "wrong-run": "run 'run-nope'",
    "too-large": "exceeds the limit of 1048576 bytes", "short-stream": "stream ended after",
    "long-stream": "beyond the announced total_size", "out-of-order": "chunks must be in order",
    "not-from-zero": "holds no bytes of it: send from offset 0",
    "no-header": "must start with a header", "two-headers": "only chunks may follow",
    "empty-stream": "must start with a header", "wrong-factors": "the header says B",
    "unspecified-factor": "is not FACTOR_A or FACTOR_B", "zero-samples": "sample_count",
    "nan-metric": "is not finite", "no-key": "idempotency_key",
}  # fmt: skip


def new_cases(run_id: str, good: bytes, update: dict) -> dict[str, tuple[list, Code, str]]:
    """name -> (messages, status, text the message must contain)."""
    extra = encode_update({**update, "base_model.model.pooler.weight": torch.ones(2, 2)})
    as_int = with_tensor(update, "classifier.bias", lambda t: t.to(torch.int32))
    huge = with_tensor(update, "1.query.lora_B.weight", lambda t: t * 1e37)
    length = struct.unpack("<Q", good[:8])[0]
    bad_json = good[:8] + b"{" + good[9 : 8 + length].replace(b'"', b"'", 1) + good[8 + length :]
    too_long_header = struct.pack("<Q", length + 10**6) + good[8:]
    chunks = chunk_messages(good, 256)
    empty = pb.UploadUpdateRequest(chunk=pb.Chunk(offset=256, data=b""))
    return {
        "unexpected-key": (good_then(extra, run_id), INVALID,
                           "unexpected key base_model.model.pooler.weight with shape (2, 2)"),
        "int32": (good_then(as_int, run_id), INVALID, "safetensors dtype I32"),
        "huge-values": (good_then(huge, run_id), INVALID,
                        "1.query.lora_B.weight: a value of magnitude"),
        "corrupt-header-json": (good_then(bad_json, run_id), INVALID, "unreadable safetensors"),
        "header-beyond-bytes": (good_then(too_long_header, run_id), INVALID,
                                "unreadable safetensors"),
        "empty-chunk": ([header(run_id, good), chunks[0], empty, *chunks[1:]], INVALID,
                        "empty chunk at offset 256"),
        "duplicate-chunk": ([header(run_id, good), chunks[0], chunks[0], *chunks[1:]], INVALID,
                            "chunk at offset 0, expected 256"),
        "huge-sample-count": (good_then(good, run_id, sample_count=2**63), INVALID,
                              "sample_count must be in 1.."),
        "over-cap": (good_then(good, run_id, total_size=MIB + 1), Code.RESOURCE_EXHAUSTED,
                     "upload of 1048577 bytes exceeds the limit"),
    }  # fmt: skip


IDENTITY_CASES = {
    "unknown": ("Bearer not-a-token-0123456789", Code.UNAUTHENTICATED, "unknown token"),
    "not-bearer": (f"Basic {token_of('alice')}", Code.UNAUTHENTICATED, "'Bearer <token>'"),
    "revoked": (f"Bearer {token_of('mallory')}", Code.PERMISSION_DENIED, "'mallory' is revoked"),
    "never-enrolled": (f"Bearer {token_of('dave')}", Code.NOT_FOUND, "'dave' has not enrolled"),
    "not-a-participant": (f"Bearer {token_of('carol')}", Code.FAILED_PRECONDITION,
                          "'carol' is not a participant of round 0"),
}  # fmt: skip


async def refused(
    client: WireClient, messages: list, metadata: tuple | None = None
) -> grpc.aio.AioRpcError:
    """The error an upload of ``messages`` ends with (``metadata``: the client's own)."""
    with pytest.raises(grpc.aio.AioRpcError) as call:
        await send_upload(client.stub, messages, metadata or client.metadata)
    return call.value


def test_every_refusal_names_the_problem_and_changes_nothing(tmp_path: Path) -> None:
    initial = synthetic_adapter()
    settings = make_settings(tmp_path, CLIENTS, min_clients=2, rounds=1, max_upload_bytes=MIB)

    async def scenario() -> None:
        async with running_server(settings, initial) as server:
            clients = {name: WireClient(server.address, token_of(name)) for name in CLIENTS}
            alice = clients["alice"]
            await asyncio.gather(alice.enroll(), clients["bob"].enroll())
            assert (await alice.get_task()).WhichOneof("task") == "train"
            for name in ("carol", "mallory"):
                await clients[name].enroll()
            server.store.revoke_client("mallory")
            update = local_update(adapter_of(await alice.download(0)), frozenset(Factor), seed=1)
            good = encode_update(update)
            run_id = server.spec.run_id
            before = snapshot(server)
            earlier = bad_uploads(run_id, good, update)
            cases = {name: (m, code, EARLIER_CASES[name]) for name, (m, code) in earlier.items()}
            assert cases.keys() == EARLIER_CASES.keys()
            cases.update(new_cases(run_id, good, update))
            for name, (messages, code, text) in cases.items():
                error = await refused(alice, messages)
                assert (error.code(), name) == (code, name), error.details()
                assert text in error.details(), (name, error.details())
                assert not before.differences(snapshot(server)), name
            for name, (authorization, code, text) in IDENTITY_CASES.items():
                metadata = (("authorization", authorization),)
                error = await refused(alice, good_then(good, run_id), metadata)
                assert (error.code(), name) == (code, name), error.details()
                assert text in error.details(), (name, error.details())
                assert not before.differences(snapshot(server)), name
            accepted = await alice.upload_messages(good_then(good, run_id))
            assert accepted.status == pb.UPLOAD_STATUS_ACCEPTED
            assert before.differences(snapshot(server)), "an accepted upload shows in the snapshot"
            for client in clients.values():
                await client.close()

    asyncio.run(scenario())


def test_other_calls_for_the_wrong_run_or_round_are_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice", "bob"], rounds=1)

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            alice = WireClient(server.address, token_of("alice"))
            await alice.enroll()
            before = snapshot(server)
            right_run = alice.run_id
            alice.run_id = "run-elsewhere"
            calls = {
                "GetTask": alice.get_task(max_wait_s=0),
                "Heartbeat": alice.heartbeat(0),
                "DownloadAdapter": alice.download_parts(0),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call
                assert error.value.code() is Code.FAILED_PRECONDITION, name
                assert "'run-elsewhere' is not the current run" in error.value.details(), name
            alice.run_id = right_run
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await alice.download_parts(3)
            assert error.value.code() is Code.NOT_FOUND
            assert "no adapter published for round 3" in error.value.details()
            assert not before.differences(snapshot(server))
            await alice.close()

    asyncio.run(scenario())


def test_the_metadata_of_a_payload_may_not_be_a_json_trick(tmp_path: Path) -> None:
    """A header whose __metadata__ is not a string map is refused by the codec (INVALID)."""
    settings = make_settings(tmp_path, ["alice"], min_clients=1, rounds=1)

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            alice = WireClient(server.address, token_of("alice"))
            await alice.enroll()
            assert (await alice.get_task()).WhichOneof("task") == "train"
            update = local_update(adapter_of(await alice.download(0)), frozenset(Factor), seed=1)
            good = encode_update(update)
            length = struct.unpack("<Q", good[:8])[0]
            head = json.loads(good[8 : 8 + length])
            head["__metadata__"] = {"producer": ["not", "a", "string"]}
            text = json.dumps(head).encode()
            bad = struct.pack("<Q", len(text)) + text + good[8 + length :]
            before = snapshot(server)
            error = await refused(alice, good_then(bad, server.spec.run_id))
            assert error.code() is INVALID and "unreadable safetensors" in error.details()
            assert not before.differences(snapshot(server))
            await alice.close()

    asyncio.run(scenario())


def test_chunks_above_the_chunk_or_message_limit_are_resource_exhausted(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"], min_clients=1, rounds=1)
    # A factor A of (2, 700000) float32 (5.6 MB): uploads of 5 MiB are within the schema's bound.
    initial = synthetic_adapter(modules={"base_model.model.l.0.query": (8, 700_000)})

    async def scenario() -> None:
        async with running_server(settings, initial) as server:
            alice = WireClient(server.address, token_of("alice"))
            await alice.enroll()
            assert (await alice.get_task()).WhichOneof("task") == "train"
            run_id, before = server.spec.run_id, snapshot(server)
            big = bytes(4 * MIB + 1)  # one byte above the 4 MiB chunk limit, within a message
            messages = [header(run_id, big + b"\x00"), *chunk_messages(big, len(big))]
            error = await refused(alice, messages)
            assert error.code() is Code.RESOURCE_EXHAUSTED
            assert "chunk of 4194305 bytes exceeds the limit 4194304" in error.details()
            wide = grpc.aio.insecure_channel(server.address, options=[
                ("grpc.max_send_message_length", 8 * MIB)])  # fmt: skip
            huge = bytes(5 * MIB)  # one message above the server's receive limit

            async def stream():  # noqa: ANN202
                yield header(run_id, huge)
                yield pb.UploadUpdateRequest(chunk=pb.Chunk(offset=0, data=huge))

            with pytest.raises(grpc.aio.AioRpcError) as call:
                stub = pb_grpc.FederationServiceStub(wide)
                await stub.UploadUpdate(stream(), metadata=alice.metadata)
            assert call.value.code() is Code.RESOURCE_EXHAUSTED, call.value.details()
            assert not before.differences(snapshot(server))
            await wide.close()
            await alice.close()

    asyncio.run(scenario())
