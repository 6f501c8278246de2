"""The transport's retry policy, its give-up, and its refusal of a bad chunk size."""

from __future__ import annotations

import random
import socket
import threading

import pytest

from fedrot_client.errors import Interrupted, ServerUnavailableError
from fedrot_client.transport import MAX_CHUNK_BYTES, RetryPolicy, Transport
from fedrot_proto.v1 import federation_pb2 as pb


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
