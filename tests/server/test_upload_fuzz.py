"""Fuzzing the upload path: the codec and the live servicer over real gRPC on loopback.

1. :func:`fedrot.codec.decode_adapter` on damaged bytes (flips, truncations, random bytes, JSON
   header edits, wrong tensors) raises only :class:`fedrot.errors.FedRotError` subclasses.
2. Damaged uploads (payload, header fields, chunk streams, identities, two faults at once)
   sent to a running server: each is refused with the status its fault calls for and a
   message, the server keeps serving, and its state (SQLite rows, files, the open round,
   the aggregator's running sums) is unchanged after every one. Afterwards good uploads are
   accepted and the round's aggregate equals the core's over the good uploads alone.

By default 3000 codec and 800 servicer examples, derandomized (the same ones every run, about
20 s here); ``FEDROT_FUZZ_EXAMPLES=5000`` runs that many of each, freshly drawn.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrot.adapters import Factor
from fedrot.codec import decode_adapter
from fedrot.errors import FedRotError
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_proto.v1 import federation_pb2_grpc as pb_grpc
from fedrot_server.service import GRPC_OPTIONS
from fedrot_server.settings import DEFAULT_MAX_UPLOAD_VALUE
from mutations import Fault, payload_faults, tensor_faults
from server_state import ServerThread, snapshot
from upload_cases import BOTH, CAP, GOOD, INITIAL, SCHEMA, UPDATE, Case, Upload, cases
from wire import (
    WireClient,
    adapter_of,
    assert_same,
    core_aggregate,
    encode_update,
    local_update,
    make_settings,
    token_of,
)

EXAMPLES = int(os.environ.get("FEDROT_FUZZ_EXAMPLES", "0")) or None
FUZZ_SETTINGS = dict(deadline=None, database=None, derandomize=EXAMPLES is None,
                     suppress_health_check=list(HealthCheck))  # fmt: skip
WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DECODINGS = ((SCHEMA, BOTH, None), (None, BOTH, None), (SCHEMA, {Factor.A}, None),
             (None, {Factor.B}, None), (SCHEMA, BOTH, DEFAULT_MAX_UPLOAD_VALUE))  # fmt: skip


# 1. The codec.


@settings(max_examples=EXAMPLES or 3000, **FUZZ_SETTINGS)
@given(
    fault=st.one_of(payload_faults(), tensor_faults(UPDATE)),
    dtype=st.sampled_from(WIRE_DTYPES),
)
def test_the_codec_raises_only_fedrot_errors_on_damaged_bytes(
    fault: Fault, dtype: torch.dtype
) -> None:
    bad = fault.apply(encode_update({k: v.to(dtype) for k, v in UPDATE.items()}))
    for schema, factors, max_abs in DECODINGS:
        try:
            decoded = decode_adapter(bad, schema, factors, max_abs=max_abs)
        except FedRotError as error:
            assert str(error), fault
        else:  # an acceptable adapter after all: it must then be exactly what was asked for
            if schema is not None:
                assert decoded.tensors.keys() == schema.expected_shapes(factors).keys()
            assert all(bool(torch.isfinite(t).all()) for t in decoded.tensors.values())
            if max_abs is not None:
                assert all(float(t.abs().max()) <= max_abs for t in decoded.tensors.values())


# 2. The servicer.


@dataclass(frozen=True)
class Federation:
    """The fuzzed server and who is who: alice and bob train in round 0; carol enrolled after
    the round opened (not a participant); mallory enrolled, then was revoked; dave holds a
    token but never enrolled."""

    thread: ServerThread
    run_id: str

    @property
    def server(self) -> Any:
        return self.thread.server


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    folder = tmp_path_factory.mktemp("fuzz")
    settings = make_settings(folder, ["alice", "bob", "carol", "mallory", "dave"], min_clients=2,
                             rounds=1, max_upload_bytes=CAP, round_deadline_s=3600.0,
                             client_timeout_s=3600.0)  # fmt: skip
    thread = ServerThread(settings, INITIAL)
    try:
        run_id = thread.call(enrol_everyone(thread))
        yield Federation(thread, run_id)
    finally:
        thread.stop()


async def enrol_everyone(thread: ServerThread) -> str:
    """alice and bob enrol and get round 0; then carol and mallory enrol; mallory is revoked."""
    names = ("alice", "bob", "carol", "mallory")
    clients = {name: WireClient(thread.address, token_of(name)) for name in names}
    for name in ("alice", "bob"):
        await clients[name].enroll()
    for name in ("alice", "bob"):
        assert (await clients[name].get_task()).WhichOneof("task") == "train"
    for name in ("carol", "mallory"):
        await clients[name].enroll()
    thread.server.store.revoke_client("mallory")
    for client in clients.values():
        await client.close()
    return thread.server.spec.run_id


def send(channel: grpc.Channel, upload: Upload) -> grpc.RpcError | pb.UploadUpdateResponse:
    stub = pb_grpc.FederationServiceStub(channel)
    try:
        return stub.UploadUpdate(iter(upload.messages()), metadata=upload.metadata, timeout=30)
    except grpc.RpcError as error:
        return error


def test_the_servicer_refuses_damaged_uploads_and_keeps_its_state(federation: Federation) -> None:
    thread, server = federation.thread, federation.server
    before = thread.run(lambda: snapshot(server))
    seen: dict[str, int] = {}

    with grpc.insecure_channel(thread.address, options=GRPC_OPTIONS) as channel:

        @settings(max_examples=EXAMPLES or 800, **FUZZ_SETTINGS)
        @given(case=cases(federation.run_id))
        def throw(case: Case | None) -> None:
            if case is None:
                seen["acceptable"] = seen.get("acceptable", 0) + 1
                return
            outcome = send(channel, case.upload)
            assert isinstance(outcome, grpc.RpcError), f"accepted: {case.why}"
            code = outcome.code()
            seen[code.name] = seen.get(code.name, 0) + 1
            assert code in case.expected, (case.why, code, outcome.details())
            assert outcome.details(), case.why
            changed = before.differences(thread.run(lambda: snapshot(server)))
            assert not changed, (case.why, changed)

        throw()
        request = health_pb2.HealthCheckRequest()
        health = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    print(f"fuzzed uploads by outcome: {seen}")
    assert sum(seen.values()) > seen.get("acceptable", 0)
    assert not server.engine._task.done()  # noqa: SLF001 - the run is still going
    thread.call(finish_round(federation))


async def finish_round(federation: Federation) -> None:
    """Good uploads from alice and bob are accepted; the aggregate is the core's of those two."""
    server = federation.server
    alice = WireClient(federation.thread.address, token_of("alice"), run_id=federation.run_id)
    bob = WireClient(federation.thread.address, token_of("bob"), run_id=federation.run_id)
    bob_update = encode_update(local_update(INITIAL, BOTH, seed=2))
    accepted = await alice.upload(0, GOOD, BOTH, sample_count=10)
    assert accepted.status == pb.UPLOAD_STATUS_ACCEPTED
    await bob.upload(0, bob_update, BOTH, sample_count=30)
    assert (await alice.get_task()).WhichOneof("task") == "done"
    expected = core_aggregate("fedrot", 0, INITIAL, [("alice", GOOD, 10), ("bob", bob_update, 30)])
    assert_same(adapter_of(await alice.download(1)), expected)
    assert [u.client for u in server.store.uploads(federation.run_id, 0)] == ["alice", "bob"]
    for client in (alice, bob):
        await client.close()
