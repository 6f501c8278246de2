"""The transport's retry policy, its give-up, and its refusal of a bad chunk size."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
from concurrent import futures

import grpc
import pytest

from fedrot_client.errors import Interrupted, ServerUnavailableError
from fedrot_client.transport import MAX_CHUNK_BYTES, RetryPolicy, Transport, encoded_chunk
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_proto.v1 import federation_pb2_grpc as pb_grpc


def test_backoff_grows_exponentially_up_to_the_cap_with_jitter() -> None:
    policy = RetryPolicy(initial_s=0.5, max_s=4.0, multiplier=2.0)
    rng = random.Random(0)
    for attempt, ceiling in enumerate([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jittered, not constant
    assert policy.delay(10_000, rng) <= 4.0


@pytest.mark.parametrize(
    "bad", [dict(initial_s=0), dict(initial_s=2, max_s=1), dict(multiplier=0.5)]
)
def test_bad_backoff_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(**bad)


def unused_address() -> str:
    """A loopback port nobody listens on (bound by us, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_an_absent_server_is_retried_then_given_up() -> None:
    clock = iter(range(0, 1000, 1))  # one "second" per look at the clock
    transport = Transport(unused_address(), "t" * 16, clock=lambda: float(next(clock)),
                          policy=RetryPolicy(0.001, 0.002, give_up_after_s=3.0))  # fmt: skip
    try:
        with pytest.raises(ServerUnavailableError, match="unreachable for 3s"):
            transport.enroll({})
    finally:
        transport.close()


def test_a_set_stop_event_interrupts_the_retries() -> None:
    stop = threading.Event()
    stop.set()
    transport = Transport(unused_address(), "t" * 16, stop=stop)
    try:
        with pytest.raises(Interrupted):
            transport.get_task("run", 1.0)
    finally:
        transport.close()


@pytest.mark.parametrize("chunk", [0, MAX_CHUNK_BYTES + 1])
def test_upload_chunks_must_be_at_most_4_mib(chunk: int) -> None:
    transport = Transport(unused_address(), "t" * 16)
    try:
        with pytest.raises(ValueError, match="chunk_bytes"):
            transport.upload_update(pb.UploadHeader(idempotency_key="k"), b"x", chunk)
    finally:
        transport.close()


class CuttingDownloads(pb_grpc.FederationServiceServicer):
    """Serves a payload in 1000-byte chunks but cuts every attempt after 25 of them; each
    chunk moves the fake clock on by 10 s (a slow link)."""

    def __init__(self, payload: bytes, now: list[float]) -> None:
        self.payload, self.now, self.offsets = payload, now, []

    def DownloadAdapter(self, request, context):  # noqa: ANN001, ANN201, N802
        self.offsets.append(request.offset)
        yield pb.DownloadAdapterResponse(header=pb.TransferHeader(
            total_size=len(self.payload), sha256=hashlib.sha256(self.payload).hexdigest(),
            chunk_bytes=1000))  # fmt: skip
        for i, offset in enumerate(range(request.offset, len(self.payload), 1000)):
            if i == 25:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            self.now[0] += 10.0
            yield pb.DownloadAdapterResponse(
                chunk=pb.Chunk(offset=offset, data=self.payload[offset : offset + 1000])
            )


def test_a_transfer_that_keeps_moving_is_never_given_up() -> None:
    """Each attempt moves 25 kB over 250 (fake) seconds before the link drops: the give-up
    after 300 s without the server never comes, since every attempt made progress."""
    payload, now = random.Random(0).randbytes(200_000), [0.0]
    service = CuttingDownloads(payload, now)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_FederationServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    transport = Transport(f"127.0.0.1:{port}", "t" * 16, clock=lambda: now[0],
                          policy=RetryPolicy(0.001, 0.002, give_up_after_s=300.0))  # fmt: skip
    try:
        assert transport.download_adapter("run", 0) == payload
        assert service.offsets == list(range(0, 200_000, 25_000))
    finally:
        transport.close()
        server.stop(None)


@pytest.mark.parametrize("offset", [0, 1, 127, 128, 300, 2**32 + 5, 2**63])
@pytest.mark.parametrize("size", [1, 127, 128, 16_384, 1_048_576])
def test_a_hand_encoded_chunk_is_the_message_protobuf_would_send(offset: int, size: int) -> None:
    """The upload's chunks skip protobuf's copies; the bytes must parse, in protobuf itself, to
    exactly the message it would have built."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    encoded = encoded_chunk(offset, memoryview(data))
    expected = pb.UploadUpdateRequest(chunk=pb.Chunk(offset=offset, data=data))
    assert pb.UploadUpdateRequest.FromString(encoded) == expected
    assert encoded == expected.SerializeToString()
