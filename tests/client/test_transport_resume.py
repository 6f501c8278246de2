"""The client's upload resumes from the bytes the server holds: a real server on loopback, the
client's Transport, and an upload broken after a few chunks, by a stalled link (the client's
stall watch cancels it) or by a proxy that cuts the connection. The retry asks the server
(QueryUpload) and sends only the remaining chunks; the server takes every byte once and counts
the update once."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

TESTS = Path(__file__).resolve().parents[1]
for folder in (TESTS / "server", TESTS / "integration"):  # wire, server_state, cutting_proxy
    if str(folder) not in sys.path:
        sys.path.append(str(folder))

from cutting_proxy import CuttingProxy  # noqa: E402
from fedrot_client.transport import RetryPolicy, Transport  # noqa: E402
from fedrot_proto.v1 import federation_pb2 as pb  # noqa: E402
from fedrot_proto.v1 import federation_pb2_grpc as pb_grpc  # noqa: E402
from fedrot_server.rpc.transfers import PayloadReceiver  # noqa: E402
from server_state import ServerThread  # noqa: E402
from wire import (  # noqa: E402
    FACTOR_NUMBERS,
    adapter_of,
    encode_update,
    local_update,
    make_settings,
    synthetic_adapter,
    token_of,
    trained_of,
)

CHUNK = 256
HELD_CHUNKS = 2  # the first attempt breaks once the server took this many chunks
WAIT_S = 20.0  # a bound on every wait, so a broken test fails instead of hanging
INITIAL = synthetic_adapter()


@dataclass
class Recorder:
    """What crossed the wire: the chunk offsets the client sent per attempt, and ``(offset,
    length)`` of every chunk the server took. ``on_taken(n)`` runs on the server after its
    ``n``-th chunk."""

    sent: list[list[int]] = field(default_factory=list)
    taken: list[tuple[int, int]] = field(default_factory=list)
    on_taken: Any = None
    held: threading.Event = field(default_factory=threading.Event)

    def take(self, offset: int, length: int) -> None:
        self.taken.append((offset, length))
        if len(self.taken) == HELD_CHUNKS:
            self.held.set()
            if self.on_taken is not None:
                self.on_taken()


class RecordingStub:
    """The transport's stub, with the request stream of each UploadUpdate recorded. The first
    attempt goes silent after HELD_CHUNKS chunks, once the server took them, so the break (the
    stall watch, or a cut) lands at a known offset, however large gRPC's send windows are."""

    def __init__(self, stub: Any, recorder: Recorder) -> None:
        self._stub, self._recorder = stub, recorder
        self.silence_over = threading.Event()
        self.UploadUpdate = self  # noqa: N815 - the stub's method name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def future(self, requests: Iterator[pb.UploadUpdateRequest | bytes], **kwargs: Any) -> Any:
        offsets: list[int] = []
        self._recorder.sent.append(offsets)
        stall = len(self._recorder.sent) == 1

        def recorded() -> Iterator[pb.UploadUpdateRequest | bytes]:
            for message in requests:
                parsed = (message if isinstance(message, pb.UploadUpdateRequest)
                          else pb.UploadUpdateRequest.FromString(message))  # chunks: serialised
                if parsed.WhichOneof("part") == "chunk":
                    if stall and len(offsets) == HELD_CHUNKS:
                        self._recorder.held.wait(WAIT_S)  # the server took what was sent
                        self.silence_over.wait(WAIT_S)  # then silence, until the call breaks
                        return
                    offsets.append(parsed.chunk.offset)
                yield message

        return self._stub.UploadUpdate.future(recorded(), **kwargs)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    add = PayloadReceiver.add

    def spy(self: PayloadReceiver, offset: int, data: bytes) -> None:
        add(self, offset, data)
        recorder.take(offset, len(data))

    monkeypatch.setattr(PayloadReceiver, "add", spy)
    return recorder


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    settings = make_settings(tmp_path, ["alice"], rounds=1, upload_takeover_s=WAIT_S)
    thread = ServerThread(settings, INITIAL)
    try:
        yield thread
    finally:
        thread.stop()


def transport_to(address: str) -> Transport:
    return Transport(address, token_of("alice"), rpc_timeout_s=WAIT_S, transfer_timeout_s=1.0,
                     policy=RetryPolicy(0.01, 0.05, give_up_after_s=WAIT_S))  # fmt: skip


def trained_update(transport: Transport) -> tuple[pb.UploadHeader, bytes]:
    """Enrol, get round 0's task, and make alice's update (header without size and digest)."""
    run_id = transport.enroll({}).run.run_id
    task = transport.get_task(run_id, 5.0).train
    reference = adapter_of(transport.download_adapter(run_id, task.round))
    payload = encode_update(local_update(reference, trained_of(task), seed=1))
    assert len(payload) > (HELD_CHUNKS + 2) * CHUNK
    factors = [FACTOR_NUMBERS[f] for f in sorted(trained_of(task))]
    header = pb.UploadHeader(run_id=run_id, round=task.round, sample_count=10,
                             idempotency_key="alice-round-0", factors=factors)  # fmt: skip
    return header, payload


def check_resumed(recorder: Recorder, server: ServerThread, payload: bytes) -> None:
    everything = list(range(0, len(payload), CHUNK))
    assert len(recorder.sent) == 2, recorder.sent
    first, second = recorder.sent
    assert first[:HELD_CHUNKS] == everything[:HELD_CHUNKS]
    assert second, "the retry sent no chunk"
    assert second[0] >= HELD_CHUNKS * CHUNK  # resumed, not started over
    assert second == everything[everything.index(second[0]) :]  # only the rest, once
    assert [offset for offset, _ in recorder.taken] == everything  # each byte taken once
    federation = server.server
    rows = server.run(lambda: federation.store.uploads(federation.spec.run_id, 0))
    assert [(row.client, row.size_bytes) for row in rows] == [("alice", len(payload))]


def test_a_stalled_upload_resumes_from_the_held_offset(
    recorder: Recorder, server: ServerThread
) -> None:
    transport = transport_to(server.address)
    stub = RecordingStub(transport._stub, recorder)  # noqa: SLF001
    transport._stub = stub  # noqa: SLF001 - the test watches the wire
    try:
        header, payload = trained_update(transport)
        reply = transport.upload_update(header, payload, CHUNK)
    finally:
        stub.silence_over.set()
        transport.close()
    assert reply.status == pb.UPLOAD_STATUS_ACCEPTED and reply.bytes_received == len(payload)
    check_resumed(recorder, server, payload)


def test_an_upload_cut_by_the_network_resumes_from_the_held_offset(
    recorder: Recorder, server: ServerThread
) -> None:
    proxy = CuttingProxy(server.server.port)
    recorder.on_taken = proxy.cut  # the link drops once the server took HELD_CHUNKS chunks
    transport = transport_to(proxy.address)
    stub = RecordingStub(transport._stub, recorder)  # noqa: SLF001
    transport._stub = stub  # noqa: SLF001 - the test watches the wire
    try:
        header, payload = trained_update(transport)
        reply = transport.upload_update(header, payload, CHUNK)
        again = transport.upload_update(header, payload, CHUNK)
        cuts = proxy.cuts
    finally:
        stub.silence_over.set()
        transport.close()
        proxy.close()
    assert cuts == 1
    assert reply.status == pb.UPLOAD_STATUS_ACCEPTED and reply.bytes_received == len(payload)
    assert again.status == pb.UPLOAD_STATUS_DUPLICATE and again.upload_id == reply.upload_id
    check_resumed(recorder, server, payload)  # the replay sent no stream at all


def test_a_server_without_query_upload_gets_the_whole_update() -> None:
    """An older server (QueryUpload UNIMPLEMENTED): the transport sends from offset 0."""

    class OldServer(pb_grpc.FederationServiceServicer):
        def __init__(self) -> None:
            self.offsets: list[int] = []

        def UploadUpdate(self, request_iterator, context):  # noqa: N802, ANN001, ANN201
            for message in request_iterator:
                if message.WhichOneof("part") == "chunk":
                    self.offsets.append(message.chunk.offset)
            return pb.UploadUpdateResponse(status=pb.UPLOAD_STATUS_ACCEPTED)

    servicer = OldServer()
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_FederationServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    transport = transport_to(f"127.0.0.1:{port}")
    try:
        header = pb.UploadHeader(run_id="run", round=0, sample_count=1, idempotency_key="k")
        reply = transport.upload_update(header, b"x" * (3 * CHUNK), CHUNK)
    finally:
        transport.close()
        grpc_server.stop(0)
    assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
    assert servicer.offsets == [0, CHUNK, 2 * CHUNK]


def test_a_digest_the_caller_knows_is_sent_as_given_and_checked_by_the_server(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon passes the digest it saved with the update, so the payload is not hashed
    again before the first byte; a wrong one is still refused by the server's own hash."""
    import fedrot_client.transport as transport_module
    from fedrot_client.errors import RejectedError

    transport = transport_to(server.address)
    try:
        header, payload = trained_update(transport)
        digest = transport_module.sha256_hex(payload)
        monkeypatch.setattr(transport_module, "sha256_hex", lambda _: pytest.fail("hashed again"))
        wrong = pb.UploadHeader()
        wrong.CopyFrom(header)
        wrong.idempotency_key = "alice-round-0-wrong"
        with pytest.raises(RejectedError, match="sha256 mismatch") as refused:
            transport.upload_update(wrong, payload, CHUNK, sha256="0" * 64)
        assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
        reply = transport.upload_update(header, payload, CHUNK, sha256=digest)
    finally:
        transport.close()
    assert reply.status == pb.UPLOAD_STATUS_ACCEPTED and reply.bytes_received == len(payload)
