"""Enrolling: asking the server for a run to join, and waiting while a standing server has none.

A single-run server answers Enroll with its run. A standing server (one that serves run after
run) answers ``wait`` while it has no run this client may join (none is active, the active one
does not include the client, or the client declined it): the client pauses ``retry_after`` and
asks again, until a run opens or a stop is asked for. Each reason to wait is logged once, not at
every poll. A client following runs passes the runs it is done with (:class:`PastRuns`): one it
declined, offered again, means the server has no other run for it (a single-run server), as
does a refusal of the enrolment (FAILED_PRECONDITION, NOT_FOUND) or the server going away for
good after a decline; one it finished, offered again, is waited out like a ``wait``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedrot_client.errors import (
    Interrupted,
    RejectedError,
    RunDeclinedError,
    ServerUnavailableError,
    Stopped,
)
from fedrot_client.signals import raise_stopped
from fedrot_client.transport import ROUND_GONE, Transport
from fedrot_proto.v1 import federation_pb2 as pb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PastRuns:
    """The runs a client following a server is done with: ``declined`` (run id -> the reason it
    gave) and ``finished`` (run ids)."""

    declined: Mapping[str, str] = field(default_factory=dict)
    finished: frozenset[str] = frozenset()

    def declined_error(self, run_id: str | None = None, why: str = "") -> RunDeclinedError:
        """The error for a declined run (``run_id``, else the last declined) that the server
        has no other run after."""
        run_id = run_id if run_id is not None else list(self.declined)[-1]
        return RunDeclinedError(f"declined run {run_id}: {self.declined[run_id]}{why}", run_id)


def enroll_in_a_run(
    transport: Transport,
    info: Mapping[str, str],
    stop: threading.Event,
    *,
    least_pause_s: float,
    past: PastRuns = PastRuns(),
) -> pb.EnrollResponse:
    """Enrol until the server names a run this client is not done with. ``least_pause_s``
    bounds how often the server is asked again. Raises :class:`RunDeclinedError` when a run in
    ``past.declined`` is offered, :class:`~fedrot_client.errors.Stopped` once ``stop`` is set."""
    waiting_for = None
    while True:
        try:
            enrolment = transport.enroll(info)
        except Interrupted as exc:
            raise_stopped(stop, exc)
        except RejectedError as exc:
            if past.declined and exc.code in ROUND_GONE:
                raise past.declined_error() from exc
            raise
        except ServerUnavailableError as exc:
            if past.declined:
                raise past.declined_error(why=" (then the server went away)") from exc
            raise
        run_id = enrolment.run.run_id
        if enrolment.HasField("wait"):
            reason = enrolment.wait.reason or "no run to join yet"
            pause = enrolment.wait.retry_after.ToNanoseconds() / 1e9
        elif run_id in past.declined:
            raise past.declined_error(run_id)
        elif run_id in past.finished:
            reason, pause = f"run {run_id} is over and the next has not started", 0.0
        else:
            return enrolment
        if reason != waiting_for:
            logger.info("the server has no run for this client (%s); waiting for one", reason)
            waiting_for = reason
        if stop.wait(max(pause, least_pause_s)):
            raise Stopped("stop requested while waiting for a run")
