"""Operator actions on the running run: :class:`~fedrot_server.runs.control.RunControl` for the
round engine, kept out of :mod:`fedrot_server.runs.rounds` as a mixin that
:class:`~fedrot_server.runs.rounds.RoundEngine` inherits.

Pausing stops new rounds from opening (the open round goes on and closes as usual); closing
the round now aggregates the updates received so far (at least one); revoking a client marks
its token revoked (every later call is refused), forgets it as a live client, and drops it
from the open round when it has not reported and others remain. All on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fedrot_server.runs.control import Activity, ClientProgress, LiveStatus
from fedrot_server.errors import WrongStateError
from fedrot_server.runs.participants import Roster
from fedrot_server.runs.round_state import OpenRound
from fedrot_server.runs.spec import RunSpec
from fedrot_server.storage.state import RunPhase
from fedrot_server.storage.store import SqliteStore

logger = logging.getLogger(__name__)
OVER = (RunPhase.FINISHED, RunPhase.STOPPED)


class OperatorActions:
    """The engine's :class:`~fedrot_server.runs.control.RunControl` (a mixin: it uses the engine's
    run state below and adds the ``_paused`` flag, read by the engine before opening a round)."""

    spec: RunSpec
    _phase: RunPhase
    _round: OpenRound | None
    _lock: asyncio.Lock
    _store: SqliteStore
    _roster: Roster
    _notify: Callable[[], None]
    _cancel_rounds: Callable[[], Awaitable[None]]
    _clock: Callable[[], float]
    _paused: bool = False
    _progress: dict[str, ClientProgress]

    def status(self) -> LiveStatus:
        """The run's id, what it is doing and whether it is paused."""
        rnd = self._round
        if self._phase in OVER:
            activity = Activity.DONE
        elif rnd is None:
            activity = Activity.WAITING
        else:
            activity = Activity.AGGREGATING if rnd.closed else Activity.TRAINING
        return LiveStatus(self.spec.run_id, activity, self._paused, dict(self._progress))

    async def pause(self) -> None:
        self._check_not_over("pause")
        self._paused = True
        logger.info("run %s paused by the operator: no new round opens", self.spec.run_id)
        self._notify()

    async def resume(self) -> None:
        self._check_not_over("resume")
        self._paused = False
        logger.info("run %s resumed by the operator", self.spec.run_id)
        self._notify()

    async def close_round(self) -> int:
        async with self._lock:
            rnd = self._round
            if rnd is None or rnd.closed:
                raise WrongStateError(f"run {self.spec.run_id} has no open round to close")
            if not rnd.arrivals:
                raise WrongStateError(f"round {rnd.index} has no update yet: nothing to aggregate")
            rnd.complete.set()
        logger.info("round %s closed by the operator with %s updates", rnd.index, rnd.arrivals)
        return rnd.index

    async def revoke(self, client: str) -> None:
        self._store.revoke_client(client)  # NotFoundError for an unknown name
        self._roster.remove(client)
        async with self._lock:
            rnd = self._round
            pending = rnd is not None and not rnd.closed and client not in rnd.reported
            if pending and client in rnd.participants and len(rnd.participants) > 1:
                rnd.participants.discard(client)
                if rnd.arrivals:
                    rnd.check_complete()
        logger.warning("client %s revoked by the operator", client)
        self._notify()

    async def stop_run(self) -> None:
        """End the run for good, as *stopped*: no round opens or closes any more (an open
        round is dropped, unaggregated), every client hears DONE with the last published
        adapter, which stays downloadable. A restart does not resume it."""
        self._check_not_over("stop")
        self._phase = RunPhase.STOPPED  # first: whoever sees the rounds cancelled reads it
        self._store.set_run_phase(self.spec.run_id, RunPhase.STOPPED, self._clock())
        await self._cancel_rounds()
        async with self._lock:
            rnd, self._round = self._round, None
            if rnd is not None:
                rnd.closed = True
                rnd.partials.clear()
        logger.warning("run %s stopped by the operator%s", self.spec.run_id,
                       "" if rnd is None else f" (round {rnd.index} dropped)")  # fmt: skip
        self._notify()

    def _check_not_over(self, action: str) -> None:
        if self._phase in OVER:
            raise WrongStateError(f"cannot {action}: run {self.spec.run_id} is {self._phase.value}")
