"""Uploads into the open round: header checks, one stream per client at a time, resumption of
a broken stream, and the commit that aggregates, spools and records an update before it is
acknowledged. Kept out of :mod:`fedrot_server.runs.rounds` as a mixin that
:class:`~fedrot_server.runs.rounds.RoundEngine` inherits (like
:class:`~fedrot_server.runs.operations.OperatorActions`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fedrot.adapters import Adapter, Factor
from fedrot.codec import HEADER_SLACK_BYTES, max_encoded_size
from fedrot_server.storage.artifacts import RunArtifacts
from fedrot_server.errors import (
    InvalidRequestError,
    PermissionDeniedError,
    TooLargeError,
    UploadInProgressError,
    WrongStateError,
)
from fedrot_server.runs.ledger import RoundLedger
from fedrot_server.runs.participants import Roster
from fedrot_server.runs.round_state import OpenRound, no_open_round, upload_id
from fedrot_server.settings import ServerSettings
from fedrot_server.runs.spec import InitialModel, RunSpec
from fedrot_server.storage.state import UploadRow
from fedrot_server.storage.store import SqliteStore
from fedrot_server.runs.tasks import (
    UploadIdentity,
    UploadOutcome,
    UploadProgress,
    UploadRequest,
    UploadTicket,
)
from fedrot_server.rpc.transfers import ReceivedPayload

logger = logging.getLogger(__name__)


class UploadIntake:
    """The engine's upload coroutines (a mixin: it uses the engine's run state below)."""

    settings: ServerSettings
    spec: RunSpec
    _initial: InitialModel
    _round: OpenRound | None
    _reference: Adapter
    _lock: asyncio.Lock
    _store: SqliteStore
    _ledger: RoundLedger
    _artifacts: RunArtifacts
    _roster: Roster
    _clock: Callable[[], float]
    _notify: Callable[[], None]
    _seen: Callable[[str], None]
    _require_client: Callable[[str, str], None]

    async def open_upload(
        self, client: str, request: UploadRequest
    ) -> UploadTicket | UploadOutcome:
        """Check an upload's header before its bytes are read; a replay is answered at once.

        The ticket's receiver holds the bytes of an earlier, broken stream of the same update
        (see :mod:`fedrot_server.rpc.partials`); the stream resumes from there or starts over. A
        declared size above ``max_upload_bytes`` or above :meth:`upload_bound` is refused here.
        """
        found = await self._free_slot(client, request.run_id, request.identity)
        if isinstance(found, UploadOutcome):
            return found
        rnd = found
        rnd.check_request(request, self.spec.limits)
        bound = self.upload_bound(rnd, late=request.identity.round_index != rnd.index)
        if request.total_size > bound:
            raise TooLargeError(
                f"upload of {request.total_size} bytes exceeds {bound} bytes, the largest "
                f"encoding of an update of this run's adapter schema (factors "
                f"{'+'.join(sorted(rnd.plan.trained))} in float32, with {HEADER_SLACK_BYTES} "
                f"bytes of header metadata)"
            )
        receiver = rnd.partials.claim(
            client, request.identity, max_chunk_bytes=self.spec.limits.max_chunk_bytes,
            new_sink=lambda: self._artifacts.draft_upload(client),
        )  # fmt: skip
        ticket = UploadTicket(client, request, asyncio.Event(), receiver)
        rnd.uploading[client] = ticket.slot
        return ticket

    def upload_bound(self, rnd: OpenRound, *, late: bool = False) -> int:
        """The most bytes an upload into ``rnd`` may declare: the largest encoding of an update
        of the run's schema with the round's trained factors (a late update, for an earlier
        round that may have trained the other factor: with both), so that the bytes held for one
        client, streaming or kept for a resume, never exceed it."""
        trained = frozenset(Factor) if late else rnd.plan.trained
        return max_encoded_size(self._initial.schema, trained)

    async def query_upload(
        self, client: str, run_id: str, identity: UploadIdentity
    ) -> UploadProgress:
        """How much of an update the server has: accepted, or the bytes held for a resume.

        Waits like :meth:`open_upload` for a stream of the client still in progress (a cut the
        server has not noticed yet), so the answer counts every byte that stream delivered.
        """
        found = await self._free_slot(client, run_id, identity)
        if isinstance(found, UploadOutcome):
            return UploadProgress(True, found.bytes_received, found.upload_id)
        return UploadProgress(False, found.partials.bytes_held(client, identity))

    async def _free_slot(
        self, client: str, run_id: str, identity: UploadIdentity
    ) -> OpenRound | UploadOutcome:
        """The round an upload goes into once the client's upload slot is free, or the outcome
        of the same update accepted before under its idempotency key.

        A second upload from a client whose first is still streaming (a retry after a cut
        connection, before the server noticed the cut) waits up to ``upload_takeover_s`` for
        the first to end, then is answered as a replay or proceeds.
        """
        self._require_client(client, run_id)
        while True:
            replay = self._replay(client, identity)
            if replay is not None:
                return replay
            rnd = self._open_round_for(client, identity.round_index)
            busy = rnd.uploading.get(client)
            if busy is None:
                return rnd
            try:
                async with asyncio.timeout(self.settings.upload_takeover_s):
                    await busy.wait()
            except TimeoutError:
                raise UploadInProgressError(
                    f"an upload from {client!r} for round {rnd.index} is still in progress"
                ) from None

    def release(self, ticket: UploadTicket, *, keep_partial: bool = False) -> None:
        """Give back an upload slot (always call after ``open_upload`` returned a ticket, once
        its receiver is drained); ``keep_partial``: the stream broke off, hold its bytes for a
        resume. Bytes not held are discarded (unless handed to :meth:`commit_upload`)."""
        rnd = self._round
        kept = False
        if rnd is not None and rnd.uploading.get(ticket.client) is ticket.slot:
            del rnd.uploading[ticket.client]
            if keep_partial and not rnd.closed:
                rnd.partials.keep(ticket.client, ticket.request.identity, ticket.receiver)
                kept = True
        if not kept:
            ticket.receiver.discard()
        ticket.slot.set()

    def _replay(self, client: str, identity: UploadIdentity) -> UploadOutcome | None:
        """The outcome of the update accepted before under ``identity``'s idempotency key
        (None if none was); InvalidRequestError when that key named another update."""
        previous = self._store.find_upload(self.spec.run_id, client, identity.idempotency_key)
        if previous is None:
            return None
        recorded = UploadIdentity(previous.round_index, previous.idempotency_key,
                                  previous.size_bytes, previous.sha256)  # fmt: skip
        if recorded != identity:
            raise InvalidRequestError(
                f"idempotency key {identity.idempotency_key!r} was used for another update "
                f"(round {previous.round_index}, {previous.size_bytes} bytes, sha256 "
                f"{previous.sha256[:12]}...): a new update needs a new key"
            )
        return UploadOutcome(True, previous.size_bytes, upload_id(previous))

    async def commit_upload(self, ticket: UploadTicket, payload: ReceivedPayload) -> UploadOutcome:
        """Aggregate a verified payload (CodecError/SchemaError leave the round unchanged) while
        its spool file is synced, then move that file into the spool and record the upload; only
        then is it acknowledged.

        The commit runs to its end even if the client goes away meanwhile (a cancelled call):
        once the worker has the update, only a finished commit (recorded) or the ledger's
        rebuild (not recorded) leaves the aggregate equal to the recorded uploads.
        """
        commit = asyncio.ensure_future(self._commit(ticket, payload))
        commit.add_done_callback(_retrieve_exception)
        return await asyncio.shield(commit)

    async def _commit(self, ticket: UploadTicket, payload: ReceivedPayload) -> UploadOutcome:
        try:
            return await self._accept(ticket, payload)
        finally:
            payload.sink.discard()  # a refused one's bytes; nothing once in the spool

    async def _accept(self, ticket: UploadTicket, payload: ReceivedPayload) -> UploadOutcome:
        client, request = ticket.client, ticket.request
        async with self._lock:
            replay = self._replay(client, request.identity)  # a retry raced a finishing commit
            if replay is not None:
                return replay
            if client not in self._roster:  # only a revocation takes an enrolled client out
                raise PermissionDeniedError(f"client {client!r} was revoked during its upload")
            rnd = self._open_round_for(client, request.round_index)
            late = request.round_index != rnd.index
            row = UploadRow(
                run_id=self.spec.run_id, round_index=request.round_index, client=client,
                idempotency_key=request.idempotency_key, sample_count=request.sample_count,
                size_bytes=payload.size, sha256=request.sha256, received_at=self._clock(),
                sequence=rnd.arrivals, metrics=dict(request.metrics),
                merged_into=rnd.index if late else None,
            )  # fmt: skip
            await self._ledger.accept(rnd, row, payload, self._reference)
        self._seen(client)
        logger.info("round %s: accepted %s bytes from %s%s (%s of %s)", rnd.index, payload.size,
                    client, f" for round {row.round_index} (late)" if late else "",
                    len(rnd.reported), rnd.target)  # fmt: skip
        self._notify()
        return UploadOutcome(False, payload.size, upload_id(row))

    def _open_round_for(self, client: str, round_index: int) -> OpenRound:
        """The round an upload of ``client`` for ``round_index`` goes into, else WrongStateError."""
        rnd = self._round
        if rnd is None:
            raise no_open_round(round_index)
        if not self._ledger.takes_late(client, round_index, rnd):
            rnd.check_accepts(client, round_index)
            if client in rnd.withdrawn:  # the round may be re-planned without it already
                raise WrongStateError(f"client {client!r} withdrew from round {round_index}")
        return rnd


def _retrieve_exception(task: asyncio.Future[UploadOutcome]) -> None:
    """Mark a commit's error as seen: when its caller was cancelled, nobody awaits it (the
    error was logged where it arose)."""
    if not task.cancelled():
        task.exception()
