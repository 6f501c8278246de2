"""What an operator may do to a running run, and what it is doing right now.

:class:`RunControl` is the seam between the dashboard's admin actions and the round engine
(:class:`~fedrot_server.rounds.RoundEngine` implements it); the dashboard depends on this
Protocol only. The actions raise :class:`~fedrot_server.errors.WrongStateError` when they are
not possible now (no open round, the run is over) and
:class:`~fedrot_server.errors.NotFoundError` for an unknown client.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class Activity(StrEnum):
    """What the run is doing: waiting for clients (or paused), training a round, aggregating
    it, or done (finished or stopped)."""

    WAITING = "waiting"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    DONE = "done"


@dataclass(frozen=True)
class LiveStatus:
    """The live state of the run ``run_id`` (not in the database)."""

    run_id: str
    activity: Activity
    paused: bool


class RunControl(Protocol):
    """Operator actions on the current run (all on the server's event loop)."""

    def status(self) -> LiveStatus: ...

    async def pause(self) -> None:
        """Open no new round until :meth:`resume` (an open round goes on)."""

    async def resume(self) -> None: ...

    async def close_round(self) -> int:
        """Close the open round now with the updates received so far; its index."""

    async def revoke(self, client: str) -> None:
        """Revoke ``client``'s token; it leaves the open round and is never sampled again."""
