"""Transfers time out when progress stops (not after a wall-clock size), then resume: a download
stalled mid-stream continues from the bytes it has; an upload whose answer never comes, or that
the server answers ABORTED (an earlier attempt still in progress), is re-sent with its key."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from fedrot_client.stalls import StallWatch
from fedrot_client.transport import RETRYABLE_CODES, RetryPolicy, Transport
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_proto.v1 import federation_pb2_grpc as pb_grpc

PAYLOAD = bytes(range(256)) * 40  # 10 KiB
CHUNK = 1024


class FlakyServicer(pb_grpc.FederationServiceServicer):
    """First download: header and two chunks, then silence. First upload: read it all, then
    silence; second upload: ABORTED; third: accepted. ``release`` ends the silences."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.download_offsets: list[int] = []
        self.upload_keys: list[str] = []

    def DownloadAdapter(self, request, context) -> Iterator[pb.DownloadAdapterResponse]:  # noqa: N802, ANN001
        self.download_offsets.append(request.offset)
        header = pb.TransferHeader(total_size=len(PAYLOAD),
                                   sha256=hashlib.sha256(PAYLOAD).hexdigest())  # fmt: skip
        yield pb.DownloadAdapterResponse(header=header)
        sent = 0
        for offset in range(request.offset, len(PAYLOAD), CHUNK):
            if len(self.download_offsets) == 1 and sent == 2:
                self.release.wait()
                return
            chunk = pb.Chunk(offset=offset, data=PAYLOAD[offset : offset + CHUNK])
            yield pb.DownloadAdapterResponse(chunk=chunk)
            sent += 1

    def UploadUpdate(self, request_iterator, context) -> pb.UploadUpdateResponse:  # noqa: N802, ANN001
        data = b"".join(m.chunk.data for m in request_iterator if m.WhichOneof("part") == "chunk")
        assert data == PAYLOAD
        self.upload_keys.append("attempt")
        if len(self.upload_keys) == 1:
            self.release.wait()
        if len(self.upload_keys) == 2:
            context.abort(grpc.StatusCode.ABORTED, "an upload from alice is still in progress")
        return pb.UploadUpdateResponse(status=pb.UPLOAD_STATUS_ACCEPTED,
                                       bytes_received=len(data), upload_id="run/0/alice")  # fmt: skip


@pytest.fixture
def flaky() -> Iterator[tuple[FlakyServicer, Transport]]:
    servicer = FlakyServicer()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_FederationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    transport = Transport(f"127.0.0.1:{port}", "t" * 16, rpc_timeout_s=0.5,
                          transfer_timeout_s=0.5,
                          policy=RetryPolicy(0.01, 0.02, give_up_after_s=60.0))  # fmt: skip
    try:
        yield servicer, transport
    finally:
        servicer.release.set()
        transport.close()
        server.stop(0)


def test_a_stalled_download_resumes_from_the_bytes_received(flaky) -> None:  # noqa: ANN001
    servicer, transport = flaky
    assert transport.download_adapter("run", 0) == PAYLOAD
    assert servicer.download_offsets == [0, 2 * CHUNK]


def test_an_unanswered_then_aborted_upload_is_sent_again(flaky) -> None:  # noqa: ANN001
    servicer, transport = flaky
    header = pb.UploadHeader(run_id="run", round=0, sample_count=3, idempotency_key="key-0")
    reply = transport.upload_update(header, PAYLOAD, CHUNK)
    assert reply.status == pb.UPLOAD_STATUS_ACCEPTED
    assert len(servicer.upload_keys) == 3


def test_aborted_is_retryable() -> None:
    assert grpc.StatusCode.ABORTED in RETRYABLE_CODES


def test_the_watch_fires_only_without_progress() -> None:
    now = [0.0]
    cancelled = threading.Event()
    watch = StallWatch(5.0, clock=lambda: now[0])
    with watch.guarding(cancelled.set):
        now[0] = 4.0
        watch.progress()  # moved at t=4: the limit counts from here
        now[0] = 8.0
        assert not watch.stalled
    assert not cancelled.is_set()
    with pytest.raises(ValueError, match="stall limit"):
        StallWatch(0.0)
