"""What an operator may do to a running run, and what it is doing right now.

:class:`RunControl` is the seam between the dashboard's admin actions and the round engine
(:class:`~fedrot_server.runs.rounds.RoundEngine` implements it); the dashboard depends on this
Protocol only. The actions raise :class:`~fedrot_server.errors.WrongStateError` when they are
not possible now (no open round, the run is over) and
:class:`~fedrot_server.errors.NotFoundError` for an unknown client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from fedrot_server.storage.state import RunPhase


class Activity(StrEnum):
    """What the run is doing: waiting for clients (or paused), training a round, aggregating
    it, or done (finished or stopped)."""

    WAITING = "waiting"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    DONE = "done"


@dataclass(frozen=True)
class ClientProgress:
    """What a client's latest heartbeat said: the round it works on, its phase
    (downloading, training, uploading, ...) and the fraction of that phase done, at ``at``."""

    round_index: int
    phase: str
    fraction: float
    at: float


@dataclass(frozen=True)
class LiveStatus:
    """The live state of the run ``run_id`` (not in the database); ``progress``: each
    client's latest heartbeat in this run."""

    run_id: str
    activity: Activity
    paused: bool
    progress: Mapping[str, ClientProgress] = field(default_factory=dict)


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


class RunQueue(Protocol):
    """A standing server's runs as the admin API submits and stops them
    (:class:`~fedrot_server.runs.run_manager.RunManager` implements it; on the event loop)."""

    def submit(self, settings: Mapping[str, Any]) -> str:
        """Queue a run of ``settings`` (RunSettings names); its id.
        :class:`~fedrot_server.errors.RunSettingsError` names each bad setting;
        WrongStateError on a server that takes no submitted runs."""

    async def stop_run(self, run_id: str) -> RunPhase:
        """Cancel a queued run or stop the active one; the phase it was in. NotFoundError,
        or WrongStateError for a run that already ended."""
