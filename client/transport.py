"""The client's side of the wire: one gRPC channel, auth metadata, chunked transfers, retries.

Every call carries ``authorization: Bearer <token>``. Calls that fail with UNAVAILABLE,
DEADLINE_EXCEEDED, a server-side CANCELLED (the server is away, restarting, shutting down or
overloaded) or ABORTED (the server still holds an earlier, broken attempt of the same upload)
are retried with exponential backoff and jitter until the server has been away for
``RetryPolicy.give_up_after_s`` (a transfer attempt that moved bytes before it broke shows the
server is there, and starts that count afresh); any other status becomes a :class:`RejectedError` at once. A
download that breaks off resumes from the bytes already received. An upload resumes from the
bytes the server holds: each attempt first asks (QueryUpload), then sends the same header,
idempotency key included, and only the chunks from that offset on (all of them when the server
holds nothing or is older and cannot tell; none when it accepted the update already, which is
then answered as a duplicate), so the server counts the update once. A transfer has no
wall-clock deadline: it is cancelled and retried once no chunk moved for ``transfer_timeout_s``
(see :mod:`fedrot_client.stalls`); after an upload's last chunk the server has
``rpc_timeout_s`` to answer. ``cancel`` (from another thread) aborts the call in flight; once
the ``stop`` event is set every call raises :class:`Interrupted`. The channel is plaintext, or
TLS (mutual TLS with a client certificate) with a :class:`TlsConfig`; a failed handshake is
UNAVAILABLE, retried like an absent server.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2

from fedrot_client.errors import Interrupted, RejectedError, ServerUnavailableError, TransferError
from fedrot_client.stalls import Stalled, StallWatch
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_proto.v1 import federation_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
MAX_CHUNK_BYTES = 4 * MIB
# A chunk message is its data plus a few bytes of framing; leave room above the 4 MiB chunk.
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 64 * 1024
# The server is away, restarting or overloaded. CANCELLED comes here only from the server's
# side (a call this client cancels raises Interrupted first): a server shutting down. ABORTED:
# the server still streams an earlier attempt of this upload (a cut it has not noticed yet).
RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
     grpc.StatusCode.ABORTED}
)
# Statuses that mean "this round (or run) is gone for us", not a fault.
ROUND_GONE: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
)
# Statuses of an upload that refuse the update itself: sending it again cannot help.
UPDATE_REFUSED: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
USER_AGENT = "fedrot-client/0.1"
UPLOAD_METHOD = f"/{pb.DESCRIPTOR.services_by_name['FederationService'].full_name}/UploadUpdate"
# Field numbers of the wire form :func:`encoded_chunk` writes (fedrot.v1: `oneof part
# { ... header = 1; Chunk chunk = 2; }`, `Chunk { uint64 offset = 1; bytes data = 2; }`).
CHUNK_FIELD = pb.UploadUpdateRequest.DESCRIPTOR.fields_by_name["chunk"].number
OFFSET_FIELD = pb.Chunk.DESCRIPTOR.fields_by_name["offset"].number
DATA_FIELD = pb.Chunk.DESCRIPTOR.fields_by_name["data"].number

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt ``k`` waits ``min(max_s, initial_s * m^k)``
    times a uniform factor in [0.5, 1]. ``give_up_after_s=None`` retries forever."""

    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0
    give_up_after_s: float | None = 600.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s or self.multiplier < 1:
            raise ValueError(
                f"bad backoff: initial {self.initial_s}, max {self.max_s}, "
                f"multiplier {self.multiplier}"
            )

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        ceiling = min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))
        return ceiling * (0.5 + 0.5 * rng.random())


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def encoded_chunk(offset: int, data: memoryview) -> bytes:
    """The serialised ``UploadUpdateRequest(chunk=Chunk(offset, data))``, built with one copy
    of ``data`` (building the message and serialising it would copy it twice more)."""
    inner = b"".join((_key(OFFSET_FIELD, 0), _varint(offset)) if offset else ())
    inner += _key(DATA_FIELD, 2) + _varint(len(data))
    return b"".join((_key(CHUNK_FIELD, 2), _varint(len(inner) + len(data)), inner, data))


def _serialized(message: pb.UploadUpdateRequest | bytes) -> bytes:
    """The upload stream's request serializer: chunks come serialised already."""
    return message if isinstance(message, bytes) else message.SerializeToString()


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the server: PEM ``root_certificates`` that sign the server's certificate (None:
    the system roots); for mutual TLS also this client's PEM ``certificate_chain`` and
    ``private_key``; ``server_name`` checks the server's certificate against that name instead
    of the host in the target (e.g. connecting by IP to a certificate issued for a DNS name)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key and vice versa")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


class Transport:
    """A connection to one ``fedrot-server``; safe to share between threads."""

    def __init__(
        self,
        target: str,
        token: str,
        *,
        policy: RetryPolicy = RetryPolicy(),
        stop: threading.Event | None = None,
        tls: TlsConfig | None = None,
        rpc_timeout_s: float = 60.0,
        transfer_timeout_s: float = 600.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._policy = policy
        self._stop = stop or threading.Event()
        self._rpc_timeout = rpc_timeout_s
        self._transfer_timeout = transfer_timeout_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._lock = threading.Lock()
        self._inflight: set[grpc.Future] = set()
        self._channel = _open_channel(target, tls, policy)
        self._stub = pb_grpc.FederationServiceStub(self._channel)
        self._stub.UploadUpdate = self._channel.stream_unary(  # chunks go out pre-serialised
            UPLOAD_METHOD, request_serializer=_serialized,
            response_deserializer=pb.UploadUpdateResponse.FromString)  # fmt: skip

    def enroll(self, info: Mapping[str, str]) -> pb.EnrollResponse:
        request = pb.EnrollRequest(info=dict(info))
        return self._retrying("Enroll", lambda: self._unary(self._stub.Enroll, request))

    def get_task(self, run_id: str, max_wait_s: float) -> pb.GetTaskResponse:
        """Long poll: the server answers within ``max_wait_s`` (plus the usual call deadline)."""
        request = pb.GetTaskRequest(run_id=run_id, max_wait=seconds(max_wait_s))
        timeout = max_wait_s + self._rpc_timeout
        return self._retrying(
            "GetTask", lambda: self._unary(self._stub.GetTask, request, timeout=timeout)
        )

    def decline_run(self, run_id: str, reason: str) -> pb.DeclineRunResponse:
        """Tell the server this client cannot take part in ``run_id`` (``reason``: one line a
        person can act on); it stops offering the run's rounds to this client."""
        request = pb.DeclineRunRequest(run_id=run_id, reason=reason)
        return self._retrying("DeclineRun", lambda: self._unary(self._stub.DeclineRun, request))

    def heartbeat(
        self, run_id: str, round_index: int, phase: int, progress: float
    ) -> pb.HeartbeatResponse:
        """One try, no retries (the next heartbeat is the retry)."""
        request = pb.HeartbeatRequest(
            run_id=run_id, round=round_index, phase=phase, progress=min(max(progress, 0.0), 1.0)
        )
        try:
            return self._unary(self._stub.Heartbeat, request)
        except grpc.FutureCancelledError as exc:  # cancel() during a stop
            raise Interrupted("Heartbeat: call cancelled") from exc
        except grpc.RpcError as exc:
            raise RejectedError("Heartbeat", exc.code(), exc.details() or "") from exc

    def download_adapter(
        self, run_id: str, round_index: int, expected: pb.AdapterRef | None = None
    ) -> bytearray:
        """The global adapter starting ``round_index``, verified against its announced SHA-256
        (and ``expected``'s size and digest when given); a broken stream resumes where it
        stopped. The bytes are the caller's (a bytearray: decoding it copies nothing); they are
        hashed on a helper thread while the next chunks arrive."""
        download = _Download(expected)

        def attempt() -> bytearray:
            request = pb.DownloadAdapterRequest(
                run_id=run_id, round=round_index, offset=download.received
            )
            call = self._stub.DownloadAdapter(request, metadata=self._metadata)
            watch = StallWatch(self._transfer_timeout)
            with self._tracked(call), watch.guarding(call.cancel):
                try:
                    for message in call:
                        watch.progress()
                        download.add(message)
                except grpc.RpcError as exc:
                    if watch.stalled and not self._stop.is_set():
                        raise Stalled("DownloadAdapter", watch.limit_s) from exc
                    raise
            return download.finish()

        try:
            return self._retrying("DownloadAdapter", attempt, moved=lambda: download.received)
        finally:
            download.close()

    def upload_update(
        self, header: pb.UploadHeader, payload: bytes, chunk_bytes: int, *, sha256: str = ""
    ) -> pb.UploadUpdateResponse:
        """Send ``payload`` after ``header`` (whose size and SHA-256 are filled in here) in
        chunks of ``chunk_bytes``; a retry re-sends the same header and idempotency key and only
        the bytes the server does not hold yet. ``sha256``: the payload's digest (hex) when the
        caller already has it (saves hashing it again before the first byte; the server checks
        it against the bytes it receives all the same)."""
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
        if not header.idempotency_key:
            raise ValueError("an upload needs an idempotency key")
        full = pb.UploadHeader()
        full.CopyFrom(header)
        full.total_size = len(payload)
        full.sha256 = sha256 or sha256_hex(payload)
        sent = [0]  # bytes taken by gRPC over all attempts: progress, for the retry loop

        def messages(watch: StallWatch, start: int) -> Iterator[pb.UploadUpdateRequest | bytes]:
            yield pb.UploadUpdateRequest(header=full)
            view = memoryview(payload).cast("B")
            for offset in range(start, len(payload), chunk_bytes):
                if self._stop.is_set():
                    return
                watch.progress()
                data = view[offset : offset + chunk_bytes]
                yield encoded_chunk(offset, data)
                sent[0] += len(data)
            watch.progress(limit_s=self._rpc_timeout)  # all sent: the server's turn to answer

        def stream_from(start: int) -> pb.UploadUpdateResponse:
            watch = StallWatch(self._transfer_timeout)
            future = self._stub.UploadUpdate.future(messages(watch, start), metadata=self._metadata)
            with self._tracked(future), watch.guarding(future.cancel):
                try:
                    return future.result()
                except (grpc.RpcError, grpc.FutureCancelledError) as exc:
                    if watch.stalled and not self._stop.is_set():
                        raise Stalled("UploadUpdate", watch.limit_s) from exc
                    raise

        def attempt() -> pb.UploadUpdateResponse:
            held = self._held_of(full)
            if held.status == pb.UPLOAD_STATUS_ACCEPTED:
                return pb.UploadUpdateResponse(status=pb.UPLOAD_STATUS_DUPLICATE,
                                               bytes_received=held.bytes_received,
                                               upload_id=held.upload_id)  # fmt: skip
            start = held.bytes_received if held.bytes_received <= len(payload) else 0
            if not start:
                return stream_from(0)
            logger.info("UploadUpdate: the server holds %s of %s bytes; resuming there", start,
                        len(payload))  # fmt: skip
            try:
                return stream_from(start)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.OUT_OF_RANGE:
                    raise
                # The held bytes went away since the query (a server restart): start over.
                logger.warning("UploadUpdate: %s; sending the whole update", exc.details())
            return stream_from(0)

        return self._retrying("UploadUpdate", attempt, moved=lambda: sent[0])

    def _held_of(self, header: pb.UploadHeader) -> pb.QueryUploadResponse:
        """What the server has of the update ``header`` announces; nothing from a server that
        predates QueryUpload (UNIMPLEMENTED)."""
        request = pb.QueryUploadRequest(run_id=header.run_id, round=header.round,
                                        idempotency_key=header.idempotency_key,
                                        total_size=header.total_size,
                                        sha256=header.sha256)  # fmt: skip
        try:
            return self._unary(self._stub.QueryUpload, request)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            return pb.QueryUploadResponse()

    def cancel(self) -> None:
        """Abort the calls in flight (they raise :class:`Interrupted` once ``stop`` is set)."""
        with self._lock:
            calls = list(self._inflight)
        for call in calls:
            call.cancel()

    def close(self) -> None:
        self.cancel()
        self._channel.close()

    def _unary(self, method, request, timeout: float | None = None):  # noqa: ANN001, ANN202
        future = method.future(
            request, timeout=timeout or self._rpc_timeout, metadata=self._metadata
        )
        with self._tracked(future):
            return future.result()

    @contextmanager
    def _tracked(self, call: grpc.Future) -> Iterator[None]:
        with self._lock:
            self._inflight.add(call)
        try:
            if self._stop.is_set():
                call.cancel()
            yield
        finally:
            call.cancel()  # a no-op once the call has finished; ends a stream we stop reading
            with self._lock:
                self._inflight.discard(call)

    def _retrying(
        self, method: str, attempt: Callable[[], T], moved: Callable[[], int] = lambda: 0
    ) -> T:
        """``attempt()`` until it succeeds, retrying the statuses of an absent server; ``moved``
        counts a transfer's progress, and an attempt that made some resets the away time."""
        failures, progress = 0, moved()
        away_since: float | None = None
        while True:
            if self._stop.is_set():
                raise Interrupted(f"{method}: stop requested")
            try:
                return attempt()
            except grpc.FutureCancelledError as exc:
                raise Interrupted(f"{method}: call cancelled") from exc
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if self._stop.is_set():
                    raise Interrupted(f"{method}: stop requested") from exc
                if code not in RETRYABLE_CODES:
                    raise RejectedError(method, code, details) from exc
            now = self._clock()
            if moved() > progress:  # bytes moved before the break: the server is there
                progress, failures, away_since = moved(), 0, None
            away_since = now if away_since is None else away_since
            limit = self._policy.give_up_after_s
            if limit is not None and now - away_since >= limit:
                raise ServerUnavailableError(
                    f"{method}: server {self.target} unreachable for {now - away_since:.0f}s "
                    f"({code.name}: {details})"
                )
            delay = self._policy.delay(failures, self._rng)
            failures += 1
            logger.warning("%s: %s (%s); retry %s in %.1fs", method, code.name, details,
                           failures, delay)  # fmt: skip
            if self._stop.wait(delay):
                raise Interrupted(f"{method}: stop requested")


class _Download:
    """The bytes of one download so far; each (re)started stream begins with a header. The
    buffer is allocated at the first header (its announced size); each chunk is copied in and
    hashed on a helper thread, in order, while the next one arrives."""

    def __init__(self, expected: pb.AdapterRef | None) -> None:
        self._expected = expected
        self._header: pb.TransferHeader | None = None
        self._buffer = bytearray()
        self.received = 0
        self._digest = hashlib.sha256()
        self._hasher: ThreadPoolExecutor | None = None
        self._hashed: Future[None] | None = None

    def add(self, message: pb.DownloadAdapterResponse) -> None:
        if message.HasField("header"):
            self._set_header(message.header)
            return
        if self._header is None:
            raise TransferError("download: a chunk arrived before the header")
        chunk = message.chunk
        data = chunk.data
        end = self.received + len(data)
        if chunk.offset != self.received or end > self._header.total_size:
            raise TransferError(
                f"download: chunk at offset {chunk.offset} of {len(data)} bytes, expected "
                f"offset {self.received} within {self._header.total_size} bytes"
            )
        piece = memoryview(self._buffer)[self.received : end]
        piece[:] = data
        self.received = end
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrot-hash")
        self._hashed = self._hasher.submit(self._digest.update, piece)

    def _set_header(self, header: pb.TransferHeader) -> None:
        if self._header is not None and (
            header.total_size, header.sha256) != (self._header.total_size, self._header.sha256
        ):  # fmt: skip
            raise TransferError(
                f"download: the adapter changed between attempts ({self._header.sha256} -> "
                f"{header.sha256})"
            )
        expected = self._expected
        if expected is not None and expected.sha256 and (
            header.sha256 != expected.sha256 or header.total_size != expected.size_bytes
        ):
            raise TransferError(
                f"download: server sends {header.total_size} bytes with sha256 {header.sha256}, "
                f"the task announced {expected.size_bytes} bytes with sha256 {expected.sha256}"
            )
        if self._header is None:
            self._buffer = bytearray(header.total_size)
        self._header = header

    def finish(self) -> bytearray:
        if self._header is None:
            raise TransferError("download: the stream ended without a header")
        if self.received != self._header.total_size:
            raise TransferError(
                f"download: stream ended after {self.received} of {self._header.total_size} bytes"
            )
        self.close()
        actual = self._digest.hexdigest()
        if actual != self._header.sha256:
            raise TransferError(
                f"download: sha256 mismatch: announced {self._header.sha256}, received {actual}"
            )
        return self._buffer

    def close(self) -> None:
        """Wait for the helper thread's hashing, then let the thread go."""
        if self._hashed is not None:
            self._hashed.result()
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None


def _open_channel(target: str, tls: TlsConfig | None, policy: RetryPolicy) -> grpc.Channel:
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.primary_user_agent", USER_AGENT),
        # Reconnect about as eagerly as the calls retry, not gRPC's default of up to 120 s.
        ("grpc.initial_reconnect_backoff_ms", int(policy.initial_s * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(policy.initial_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(policy.max_s * 1000)),
    ]
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, tls.credentials(), options=options)
