"""The gRPC face of the round engine: decode, call the engine, encode.

Errors meet the wire in one place, :func:`status_of`: every exception a handler raises is
mapped to a status code and a message naming the problem. A payload whose SHA-256 differs
from its header's is INVALID_ARGUMENT (the client sent inconsistent data; DATA_LOSS is kept
for corruption the server itself detects in its own state). An upload stream's first chunk
may resume the bytes an earlier, broken stream of the same update left (see
:mod:`fedrot_server.rpc.partials`); another offset than those bytes' end, or 0, is OUT_OF_RANGE.
A stream that breaks off after its header was accepted (cut, stalled, cancelled, or ended
before the announced size) is recorded as interrupted, not refused: its bytes are held.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import StatusCode

from fedrot.errors import CodecError, SchemaError
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_proto.v1 import federation_pb2_grpc as pb_grpc
from fedrot_server.rpc import messages
from fedrot_server.rpc.auth import TokenAuthenticator
from fedrot_server.errors import (
    IncompleteUploadError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ResumeOffsetError,
    StalledError,
    TooLargeError,
    UnauthenticatedError,
    UploadInProgressError,
    WrongStateError,
)
from fedrot_server.runs.run_manager import RunManager
from fedrot_server.runs.tasks import UploadOutcome, UploadTicket
from fedrot_server.storage.telemetry import InterruptionRow, TelemetryLog
from fedrot_server.rpc.transfers import MAX_QUEUED_BYTES, PayloadReceiver, payload_chunks

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: tuple[tuple[type[BaseException], StatusCode], ...] = (
    (UnauthenticatedError, StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, StatusCode.PERMISSION_DENIED),
    (NotFoundError, StatusCode.NOT_FOUND),
    (UploadInProgressError, StatusCode.ABORTED),
    (StalledError, StatusCode.DEADLINE_EXCEEDED),
    (ResumeOffsetError, StatusCode.OUT_OF_RANGE),
    (WrongStateError, StatusCode.FAILED_PRECONDITION),
    (TooLargeError, StatusCode.RESOURCE_EXHAUSTED),
    (InvalidRequestError, StatusCode.INVALID_ARGUMENT),
    (CodecError, StatusCode.INVALID_ARGUMENT),
    (SchemaError, StatusCode.INVALID_ARGUMENT),
)


def status_of(error: BaseException) -> tuple[StatusCode, str]:
    """The status code and message for ``error``; anything unexpected is INTERNAL."""
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code, str(error)
    return StatusCode.INTERNAL, f"internal server error ({type(error).__name__})"


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    code, message = status_of(error)
    if code is StatusCode.INTERNAL:
        logger.error("%s failed", method, exc_info=error)
    else:
        logger.info("%s refused: %s: %s", method, code.name, message)
    await context.abort(code, message)


Handler = Callable[..., Awaitable[Any]]


def unary_errors(handler: Handler) -> Handler:
    """Map exceptions of a unary-response handler to status codes."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except Exception as error:  # noqa: BLE001 - the one place errors meet the wire
            await _abort(context, error, handler.__name__)

    return wrapper


def stream_errors(handler: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Map exceptions of a server-streaming handler to status codes."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in handler(self, request, context):
                yield item
        except Exception as error:  # noqa: BLE001 - the one place errors meet the wire
            await _abort(context, error, handler.__name__)

    return wrapper


async def _next_within(messages: AsyncIterator[Any], stall_s: float) -> Any:
    """The next of ``messages`` (None at their end); StalledError once none came for
    ``stall_s`` seconds (a client gone silent before its header or mid-upload gives its slot
    back, however large the upload)."""
    try:
        async with asyncio.timeout(stall_s):
            return await anext(messages, None)
    except TimeoutError:
        raise StalledError(f"no message for {stall_s:g}s: upload abandoned") from None


async def _until_stalled(messages: AsyncIterator[Any], stall_s: float) -> AsyncIterator[Any]:
    """``messages`` until they end, each within ``stall_s`` of the last (:func:`_next_within`)."""
    while (message := await _next_within(messages, stall_s)) is not None:
        yield message


async def _receive(
    receiver: PayloadReceiver, messages: AsyncIterator[pb.UploadUpdateRequest], stall_s: float
) -> None:
    """Feed the chunks after an upload's header to ``receiver``: the first continues the bytes
    it holds or starts over (:meth:`PayloadReceiver.resume_at`). The receiver's thread hashes
    and writes a chunk while the next one arrives, at most MAX_QUEUED_BYTES behind; however the
    stream ends, every chunk taken is stored before this returns or raises."""
    resumed = False
    try:
        async for message in _until_stalled(messages, stall_s):
            if message.WhichOneof("part") != "chunk":
                raise InvalidRequestError("only chunks may follow the upload header")
            if not resumed:
                receiver.resume_at(message.chunk.offset)
                resumed = True
            receiver.add(message.chunk.offset, message.chunk.data)
            await receiver.settle(MAX_QUEUED_BYTES)
    finally:
        await receiver.drain()


# How an upload stream breaks off once its header was accepted: the bytes stay for a resume.
INTERRUPTIONS = (StalledError, IncompleteUploadError, asyncio.CancelledError)


def _how_it_broke(cut: BaseException) -> str:
    if isinstance(cut, asyncio.CancelledError):
        return "call cancelled (connection lost or client gone)"
    if isinstance(cut, StalledError):
        return str(cut)
    return "stream ended early"


class FederationServicer(pb_grpc.FederationServiceServicer):
    """``fedrot.v1.FederationService`` over the server's runs (:class:`RunManager`, which
    routes each call by run id); with ``telemetry``, refused and interrupted uploads and bytes
    sent are recorded for the dashboard."""

    def __init__(
        self,
        runs: RunManager,
        authenticator: TokenAuthenticator,
        telemetry: TelemetryLog | None = None,
    ) -> None:
        self._runs = runs
        self._auth = authenticator
        self._telemetry = telemetry

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        return self._auth.client_of(context.invocation_metadata())

    @unary_errors
    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        enrolment = self._runs.enroll(self._client(context), dict(request.info))
        return messages.enroll_response(enrolment)

    @unary_errors
    async def GetTask(self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext) -> pb.GetTaskResponse:
        max_wait = request.max_wait.ToNanoseconds() / 1e9 if request.HasField("max_wait") else None
        task = await self._runs.next_task(self._client(context), request.run_id, max_wait)
        return messages.task_response(task)

    @stream_errors
    async def DownloadAdapter(
        self, request: pb.DownloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadAdapterResponse]:
        client = self._client(context)
        encoded = await self._runs.adapter_for(client, request.run_id, request.round)
        chunk_bytes = self._runs.settings.chunk_bytes
        chunks = payload_chunks(encoded.payload, offset=request.offset, chunk_bytes=chunk_bytes)
        yield messages.download_header(encoded, chunk_bytes)
        sent = 0
        for offset, data in chunks:
            yield messages.download_chunk(offset, data)
            sent += len(data)
        self._runs.count_download(request.run_id, request.round, sent)
        if self._telemetry is not None:
            self._telemetry.record_download(request.run_id, request.round, client, sent)

    @unary_errors
    async def UploadUpdate(
        self, request_iterator: AsyncIterator[pb.UploadUpdateRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadUpdateResponse:
        client = self._client(context)
        messages_in = aiter(request_iterator)
        first = await _next_within(messages_in, self._runs.settings.upload_stall_s)
        header = first.header if first is not None and first.HasField("header") else None
        round_index = header.round if header is not None else -1
        run_id = header.run_id if header is not None else ""
        try:
            return await self._upload(client, first, messages_in)
        except INTERRUPTIONS:
            raise  # recorded by _upload as an interruption
        except Exception as error:
            self._record_refusal(client, run_id, round_index, error)
            raise

    def _record_refusal(self, client: str, run_id: str, round_index: int, error: Exception) -> None:
        """Record a refused upload (reason: its status name) for the dashboard."""
        if self._telemetry is None:
            return
        code, message = status_of(error)
        try:
            active = self._runs.active
            run_id = run_id or (active.run_id if active is not None else "")
            self._telemetry.record_refusal(run_id, round_index, client, code.name, message,
                                           time.time())  # fmt: skip
        except Exception:  # noqa: BLE001 - telemetry must not change the answer
            logger.warning("could not record a refused upload of %s", client, exc_info=True)

    def _record_interruption(self, ticket: UploadTicket, cut: BaseException) -> None:
        """Record an upload stream that broke off, and the bytes it left, for the dashboard."""
        if self._telemetry is None:
            return
        held, total = ticket.receiver.received, ticket.request.total_size
        detail = (f"{_how_it_broke(cut)} after {held} of {total} bytes (held for a resume "
                  "while the round is open)")  # fmt: skip
        row = InterruptionRow(ticket.request.run_id, ticket.request.round_index,
                              ticket.client, held, total, detail, time.time())  # fmt: skip
        try:
            self._telemetry.record_interruption(row)
        except Exception:  # noqa: BLE001 - telemetry must not change the answer
            logger.warning("could not record an interrupted upload of %s", ticket.client,
                           exc_info=True)  # fmt: skip

    async def _upload(
        self,
        client: str,
        first: pb.UploadUpdateRequest | None,
        messages_in: AsyncIterator[pb.UploadUpdateRequest],
    ) -> pb.UploadUpdateResponse:
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidRequestError("an upload must start with a header message")
        request = messages.upload_request(first.header)
        engine = self._runs.engine_for(request.run_id)
        opened = await engine.open_upload(client, request)
        if isinstance(opened, UploadOutcome):
            return messages.upload_response(opened)
        receiver, concluded = opened.receiver, False
        try:
            try:
                await _receive(receiver, messages_in, self._runs.settings.upload_stall_s)
                # The whole payload is here: from now on it is counted or refused, never resumed.
                concluded = receiver.complete
                payload = await receiver.finish()
            except INTERRUPTIONS as cut:
                self._record_interruption(opened, cut)
                raise
            outcome = await engine.commit_upload(opened, payload)
        finally:
            engine.release(opened, keep_partial=not concluded)
        return messages.upload_response(outcome)

    @unary_errors
    async def QueryUpload(
        self, request: pb.QueryUploadRequest, context: grpc.aio.ServicerContext
    ) -> pb.QueryUploadResponse:
        identity = messages.upload_identity(request)
        engine = self._runs.engine_for(request.run_id)
        progress = await engine.query_upload(self._client(context), request.run_id, identity)
        return messages.query_response(progress)

    @unary_errors
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        client = self._client(context)
        messages.check_heartbeat(request)
        engine = self._runs.engine_for(request.run_id)
        if request.phase == pb.CLIENT_PHASE_WITHDRAWN:
            await engine.withdraw(client, request.run_id, request.round)
        reply = engine.heartbeat(client, request.run_id, request.round,
                                 messages.phase_name(request.phase), request.progress)  # fmt: skip
        return messages.heartbeat_response(reply)

    @unary_errors
    async def DeclineRun(
        self, request: pb.DeclineRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeclineRunResponse:
        reason = messages.decline_reason(request)
        await self._runs.decline(self._client(context), request.run_id, reason)
        return pb.DeclineRunResponse()
