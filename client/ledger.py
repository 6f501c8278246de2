"""One client's rounds of one run: what is done, the saved update, uploads and withdrawals.

The :class:`RoundLedger` is where a round ends. It keeps the state folder's record (the
rounds done here, the update saved but not yet accepted), uploads an update under the
round's idempotency key (resumable: see :mod:`fedrot_client.transport`), books the outcome
(``fed.rounds``) and tells the server when a round is given up (a ``WITHDRAWN`` heartbeat).
A round is done here once its update was accepted or it was given up: neither a retry nor a
restart works on it again.
"""

from __future__ import annotations

import logging
import threading
from typing import NoReturn

from fedrot_client.errors import (
    Interrupted,
    RejectedError,
    RoundClosedError,
    UpdateRefusedError,
)
from fedrot_client.messages import factor_messages
from fedrot_client.run_info import RoundRecord, Submission
from fedrot_client.signals import raise_stopped
from fedrot_client.state import ClientState, PendingUpload
from fedrot_client.transport import MAX_CHUNK_BYTES, ROUND_GONE, UPDATE_REFUSED, Transport
from fedrot_proto.v1 import federation_pb2 as pb

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1024 * 1024


class RoundLedger:
    """The rounds of the run last :meth:`join`-ed; ``records`` lists their outcomes."""

    def __init__(self, transport: Transport, state: ClientState, stop: threading.Event) -> None:
        self._transport = transport
        self._state = state
        self._stop = stop
        self._run_id = ""
        self._chunk_bytes = DEFAULT_CHUNK_BYTES
        self.records: list[RoundRecord] = []

    def join(self, run_id: str, client_id: str, limits: pb.TransferLimits) -> None:
        """Record the enrolment (each run's rounds are kept apart in the state folder);
        StateError when the state folder is another client's."""
        self._state.record_enrolment(run_id, client_id)
        self._run_id = run_id
        self._chunk_bytes = min(limits.chunk_bytes or DEFAULT_CHUNK_BYTES,
                                limits.max_chunk_bytes or MAX_CHUNK_BYTES, MAX_CHUNK_BYTES)

    def is_done(self, round_index: int) -> bool:
        return round_index in self._state.completed_rounds(self._run_id)

    def saved_round(self) -> int | None:
        """The round of the update saved but not yet accepted, if any."""
        found = self._state.pending(self._run_id)
        return None if found is None else found[0].round_index

    def record(self, record: RoundRecord) -> None:
        self.records.append(record)

    def save_pending(self, pending: PendingUpload, payload: bytes) -> None:
        """Keep an update until the server accepts it (a restart sends it, not trains again)."""
        self._state.save_pending(pending, payload)

    def send_pending(self) -> None:
        """Re-send an update saved before a restart and not yet accepted."""
        found = self._state.pending(self._run_id)
        if found is None:
            return
        logger.info("round %s: re-sending the update saved before a restart",
                    found[0].round_index)  # fmt: skip
        try:
            self.send_update(*found)
        except (RoundClosedError, UpdateRefusedError) as exc:
            logger.warning("%s", exc)

    def send_update(self, pending: PendingUpload, payload: bytes) -> Submission:
        """Upload a saved update; once accepted the round is done here for good. Raises
        :class:`RoundClosedError` or :class:`UpdateRefusedError` when it will not count, and
        :class:`~fedrot_client.errors.Stopped` on a stop (the update stays saved)."""
        header = pb.UploadHeader(
            run_id=pending.run_id, round=pending.round_index, sample_count=pending.sample_count,
            metrics=dict(pending.metrics), idempotency_key=pending.idempotency_key,
            factors=factor_messages(pending.factors),
        )  # fmt: skip
        try:
            reply = self._transport.upload_update(header, payload, self._chunk_bytes,
                                                  sha256=pending.sha256)  # fmt: skip
        except Interrupted as exc:
            raise_stopped(self._stop, exc)
        except RejectedError as exc:
            self._refused(pending, exc)
        self._state.record_completed(pending.run_id, pending.round_index)
        self._state.clear_pending(pending.run_id)
        status = "duplicate" if reply.status == pb.UPLOAD_STATUS_DUPLICATE else "accepted"
        self.records.append(RoundRecord(pending.round_index, status, pending.sample_count,
                                        pending.metrics.get("train_loss"), len(payload)))
        logger.info("round %s: update %s (%s bytes, upload %s)", pending.round_index, status,
                    len(payload), reply.upload_id)  # fmt: skip
        return Submission(pending.round_index, status, reply.upload_id, len(payload))

    def _refused(self, pending: PendingUpload, exc: RejectedError) -> NoReturn:
        """Book a refused upload and raise the matching :class:`RoundLostError`."""
        round_index = pending.round_index
        if exc.code in UPDATE_REFUSED:
            self.give_up_round(round_index, f"the server refused the update: {exc}")
            raise UpdateRefusedError(f"round {round_index}: the server refused the update: "
                                     f"{exc.details}", round_index) from exc  # fmt: skip
        if exc.code not in ROUND_GONE:
            raise exc
        self._state.clear_pending(pending.run_id)
        self.records.append(RoundRecord(round_index, "dropped"))
        logger.warning("round %s: the server no longer takes it (%s); dropped", round_index,
                       exc.details)  # fmt: skip
        raise RoundClosedError(f"round {round_index} closed before the update was accepted: "
                               f"{exc.details}", round_index) from exc  # fmt: skip

    def give_up_round(self, round_index: int, why: str, *, tell_server: bool = True) -> None:
        """Drop a round for good: its saved update is discarded and the round marked done here;
        the server is told (withdrawal) unless ``tell_server`` is false."""
        self._state.clear_pending(self._run_id)
        self._state.record_completed(self._run_id, round_index)
        self.records.append(RoundRecord(round_index, "dropped"))
        logger.warning("round %s: dropped: %s", round_index, why)
        if tell_server:
            self.withdraw(round_index)

    def withdraw(self, round_index: int) -> None:
        """Tell the server we give up ``round_index`` (best effort: a server that cannot be
        told replaces us at the deadline all the same)."""
        try:
            self._transport.heartbeat(self._run_id, round_index, pb.CLIENT_PHASE_WITHDRAWN, 0)
        except (RejectedError, Interrupted) as exc:
            logger.debug("could not withdraw from round %s: %s", round_index, exc)

