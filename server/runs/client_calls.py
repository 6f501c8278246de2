"""The engine's client-facing calls other than uploads: enrolment, the long-polled next task,
the global adapter's download, heartbeats, withdrawing from a round and declining a run, with
the checks they share. Kept out of :mod:`fedrot_server.runs.rounds` as a mixin that
:class:`~fedrot_server.runs.rounds.RoundEngine` inherits (like
:class:`~fedrot_server.runs.uploads.UploadIntake`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from fedrot_server.errors import NotFoundError, WrongStateError
from fedrot_server.runs.control import ClientProgress
from fedrot_server.runs.ledger import RoundLedger
from fedrot_server.runs.participants import Roster
from fedrot_server.runs.round_state import OpenRound, check_client_info, derive_seed
from fedrot_server.runs.spec import InitialModel, RunSpec
from fedrot_server.runs.tasks import (
    AdapterRef,
    DoneTask,
    Enrolment,
    HeartbeatReply,
    Task,
    TrainTask,
    WaitTask,
)
from fedrot_server.runs.worker import EncodedAdapter
from fedrot_server.settings import ServerSettings
from fedrot_server.storage.state import RunPhase
from fedrot_server.storage.store import SqliteStore

logger = logging.getLogger(__name__)


class ClientCalls:
    """The engine's client-facing calls, the client already authenticated (a mixin: it uses
    the engine's run state below; uploads are :class:`~fedrot_server.runs.uploads.UploadIntake`'s).
    """

    settings: ServerSettings
    spec: RunSpec
    _initial: InitialModel
    _phase: RunPhase
    _round: OpenRound | None
    _published: tuple[int, EncodedAdapter] | None
    _bytes_out: dict[int, int]
    _told_done: set[str]
    _progress: dict[str, ClientProgress]
    _declined: dict[str, str]
    _paused: bool
    _changed: asyncio.Event
    _lock: asyncio.Lock
    _store: SqliteStore
    _ledger: RoundLedger
    _roster: Roster
    _clock: Callable[[], float]
    _now: Callable[[], float]
    _notify: Callable[[], None]
    _seen: Callable[[str], None]
    _live: Callable[[], list[str]]

    def enroll(self, client: str, info: Mapping[str, str]) -> Enrolment:
        check_client_info(info)
        self._store.enroll(self.spec.run_id, client, info, self._clock())
        self._roster.touch(client, self._now())
        self._notify()
        logger.info("client %s enrolled in run %s", client, self.spec.run_id)
        return Enrolment(client, self.spec, self._initial.schema, self._initial.fingerprint,
                         self._phase)  # fmt: skip

    async def next_task(self, client: str, run_id: str, max_wait_s: float | None) -> Task:
        """Long poll: a task as soon as there is one, else WAIT after the wait bound."""
        self._require_client(client, run_id)
        loop = asyncio.get_running_loop()
        bound = self.settings.max_task_wait_s
        end = loop.time() + (bound if max_wait_s is None else max(0.0, min(max_wait_s, bound)))
        self._roster.hold(client)
        try:
            while True:
                changed = self._changed
                task = self._task_for(client)
                if task is not None or loop.time() >= end:
                    return task or WaitTask(reason=self._wait_reason(client))
                await set_within(changed, end - loop.time())
        finally:
            self._roster.release(client)
            self._seen(client)

    def adapter_for(self, client: str, run_id: str, round_index: int) -> EncodedAdapter:
        """The global adapter round ``round_index`` starts from (the final one after the run)."""
        self._require_client(client, run_id)
        assert self._published is not None
        published, encoded = self._published
        if round_index < published:
            raise WrongStateError(
                f"round {round_index} is over; the current global adapter is round {published}'s"
            )
        if round_index > published:
            raise NotFoundError(f"no adapter published for round {round_index} yet")
        return encoded

    def count_download(self, round_index: int, size: int) -> None:
        self._bytes_out[round_index] = self._bytes_out.get(round_index, 0) + size

    def heartbeat(
        self, client: str, run_id: str, round_index: int, phase: str = "", fraction: float = 0.0
    ) -> HeartbeatReply:
        """The reply to ``client``'s heartbeat; its ``phase`` and ``fraction`` done are kept
        (in memory) for the dashboard's live progress."""
        self._require_client(client, run_id)
        self._seen(client)
        if phase:
            self._progress[client] = ClientProgress(round_index, phase, fraction, self._clock())
        rnd = self._round
        is_open = rnd is not None and (
            (rnd.index == round_index and rnd.expects(client))
            or self._ledger.takes_late(client, round_index, rnd)
        )
        current = rnd.index if rnd is not None else self._published_round()
        return HeartbeatReply(self._phase, current, is_open, self.spec.heartbeat_interval_s)

    async def withdraw(self, client: str, run_id: str, round_index: int) -> None:
        """``client`` gives up ``round_index`` (it cannot make or send its update): the round
        no longer waits for it, and replaces it at the deadline like a silent participant."""
        self._require_client(client, run_id)
        async with self._lock:
            rnd = self._round
            if rnd is None or rnd.index != round_index or not rnd.expects(client):
                return
            rnd.withdrawn.add(client)
            rnd.partials.drop(client)
            rnd.check_complete()
        logger.warning("round %s: %s withdrew (it cannot send an update)", round_index, client)
        self._notify()

    async def decline(self, client: str, run_id: str, reason: str) -> None:
        """``client`` cannot take part in the run (its data does not fit): it is never offered
        the run's rounds again (an open round stops waiting for it, as after a withdrawal, and
        replaces it at the deadline), and the reason is recorded for the dashboard."""
        self._require_client(client, run_id)
        self._declined[client] = reason
        self._store.decline(run_id, client, reason)
        self._roster.remove(client)
        async with self._lock:
            rnd = self._round
            if rnd is not None and rnd.expects(client):
                rnd.withdrawn.add(client)
                rnd.partials.drop(client)
                rnd.check_complete()
        logger.warning("client %s declined run %s: %s", client, run_id, reason)
        self._notify()

    # Checks and small pieces.

    def _task_for(self, client: str) -> Task | None:
        assert self._published is not None
        published, encoded = self._published
        ref = AdapterRef(published, encoded.size, encoded.sha256)
        if self._phase is RunPhase.FINISHED:
            self._mark_told_done(client)
            return DoneTask(published, ref, "the run is finished")
        if self._phase is RunPhase.STOPPED:
            self._mark_told_done(client)
            return DoneTask(published, ref, "the run was stopped")
        rnd = self._round
        if rnd is None or not rnd.expects(client):
            return None
        left = max(0.0, rnd.deadline - self._now())
        seed = derive_seed(self.spec.seed, rnd.index, client)
        training = self.spec.training.for_round(rnd.index, self.spec.rounds)
        return TrainTask(rnd.index, rnd.plan.trained, training, seed,
                         self._clock() + left, left, ref)  # fmt: skip

    def _wait_reason(self, client: str) -> str:
        rnd = self._round
        if rnd is None and self._paused:
            return "the run is paused by the operator"
        if rnd is None:
            return f"waiting for {self.settings.min_clients} clients ({len(self._live())} live)"
        if client in rnd.reported:
            return f"round {rnd.index}: update received, waiting for the others"
        return f"round {rnd.index}: not a participant"

    def _require_client(self, client: str, run_id: str) -> None:
        if run_id != self.spec.run_id:
            raise WrongStateError(f"run {run_id!r} is not the current run {self.spec.run_id!r}")
        if client in self._declined:
            raise WrongStateError(f"client {client!r} declined run {run_id}: "
                                  f"{self._declined[client]}")  # fmt: skip
        if client not in self._roster:
            raise NotFoundError(f"client {client!r} has not enrolled in run {self.spec.run_id}")

    def _published_round(self) -> int:
        return self._published[0] if self._published is not None else 0

    def _mark_told_done(self, client: str) -> None:
        if client not in self._told_done:
            self._told_done.add(client)
            self._notify()


async def set_within(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether ``event`` is set within ``timeout_s`` seconds. ``asyncio.timeout``, not
    ``wait_for``: Python 3.11's ``wait_for`` can swallow a cancellation that arrives as its
    timeout fires, and the run would then go on after
    :meth:`~fedrot_server.runs.rounds.RoundEngine.stop` cancelled it."""
    try:
        async with asyncio.timeout(max(0.0, timeout_s)):
            await event.wait()
    except TimeoutError:
        return False
    return True
