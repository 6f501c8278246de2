"""What the server remembers, as plain rows, and the read-only interface over them.

The dashboard (and anything else that only looks) depends on :class:`StateReader`, never on
SQLite or the round engine. Times are Unix seconds (wall clock, float).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Protocol


class RunPhase(StrEnum):
    """``queued``: submitted to a standing server, not started yet (a queued run stopped
    before it started is ``stopped`` with no round)."""

    QUEUED = "queued"
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    STOPPED = "stopped"


class RoundPhase(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class RunRow:
    run_id: str
    created_at: float
    spec: Mapping[str, Any]
    phase: RunPhase
    rounds_completed: int
    finished_at: float | None = None
    queue_position: int | None = None  # 1 = the next to start; None: not queued


@dataclass(frozen=True)
class ClientRow:
    """A client of a run: ``name`` is its id; ``info`` is what it said when enrolling."""

    name: str
    enrolled_at: float
    last_seen: float
    revoked: bool
    info: Mapping[str, str] = field(default_factory=dict)
    declined: str | None = None  # the reason the client gave for declining the run


@dataclass(frozen=True)
class RoundRow:
    """One round of a run; ``summary`` holds the closing figures (bytes, error, timings)."""

    run_id: str
    round_index: int
    phase: RoundPhase
    opened_at: float
    deadline: float
    participants: tuple[str, ...]
    closed_at: float | None = None
    reporters: tuple[str, ...] = ()
    adapter_sha256: str | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "summary", MappingProxyType(dict(self.summary)))


@dataclass(frozen=True)
class UploadRow:
    """An accepted update for round ``round_index``. ``merged_into`` is the round it was
    aggregated into when that is a later one (a late update; None: ``round_index``), and
    ``sequence`` orders the uploads aggregated into one round by arrival."""

    run_id: str
    round_index: int
    client: str
    idempotency_key: str
    sample_count: int
    size_bytes: int
    sha256: str
    received_at: float
    sequence: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    merged_into: int | None = None

    @property
    def merged_round(self) -> int:
        return self.round_index if self.merged_into is None else self.merged_into


@dataclass(frozen=True)
class MetricRow:
    """A named number of a round: ``source`` is a client name or ``"server"``."""

    run_id: str
    round_index: int
    source: str
    name: str
    value: float


class StateReader(Protocol):
    """Read-only view of the server's state (what the dashboard uses)."""

    def runs(self) -> list[RunRow]: ...

    def run(self, run_id: str) -> RunRow | None: ...

    def clients(self, run_id: str) -> list[ClientRow]: ...

    def rounds(self, run_id: str) -> list[RoundRow]: ...

    def uploads(self, run_id: str, round_index: int) -> list[UploadRow]: ...

    def metrics(self, run_id: str) -> list[MetricRow]: ...
