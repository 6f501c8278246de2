"""What the round engine answers: tasks, enrolments, upload outcomes, heartbeats.

Plain frozen dataclasses; the servicer turns them into protocol messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedrot.adapters import AdapterSchema, Factor
from fedrot_server.run_settings import TrainingSettings
from fedrot_server.runs.spec import RunSpec
from fedrot_server.storage.state import RunPhase
from fedrot_server.rpc.transfers import PayloadReceiver


@dataclass(frozen=True)
class AdapterRef:
    """A published global adapter: the round it starts, its size in bytes and SHA-256."""

    round_index: int
    size: int
    sha256: str


@dataclass(frozen=True)
class WaitTask:
    reason: str
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class TrainTask:
    """Train ``trained`` factors from ``adapter`` and upload them before ``deadline`` (Unix s)."""

    round_index: int
    trained: frozenset[Factor]
    training: TrainingSettings
    seed: int
    deadline: float
    time_left_s: float
    adapter: AdapterRef


@dataclass(frozen=True)
class DoneTask:
    """The run is over; ``server_continues``: the server stays up for further runs."""

    rounds_completed: int
    final_adapter: AdapterRef
    reason: str
    server_continues: bool = False


Task = WaitTask | TrainTask | DoneTask


@dataclass(frozen=True)
class EnrolmentWait:
    """No run this client may join now: enrol again after ``wait``."""

    client_id: str
    wait: WaitTask


@dataclass(frozen=True)
class Enrolment:
    client_id: str
    spec: RunSpec
    schema: AdapterSchema
    fingerprint: str
    phase: RunPhase


@dataclass(frozen=True)
class UploadIdentity:
    """Which update an upload's bytes belong to: held bytes are resumed only by a stream (or
    reported only to a query) naming the same round, key, size and digest."""

    round_index: int
    idempotency_key: str
    total_size: int
    sha256: str


@dataclass(frozen=True)
class UploadRequest:
    """An upload's header: which update the bytes that follow are."""

    run_id: str
    round_index: int
    sample_count: int
    total_size: int
    sha256: str
    idempotency_key: str
    factors: frozenset[Factor]
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def identity(self) -> UploadIdentity:
        return UploadIdentity(self.round_index, self.idempotency_key, self.total_size,
                              self.sha256)  # fmt: skip


@dataclass(frozen=True)
class UploadTicket:
    """Permission to send the bytes of ``request``: the engine holds the client's upload slot
    until released (``slot`` is set then). ``receiver`` already holds the bytes of an earlier,
    broken stream of the same update (or none)."""

    client: str
    request: UploadRequest
    slot: asyncio.Event = field(compare=False)
    receiver: PayloadReceiver = field(compare=False)


@dataclass(frozen=True)
class UploadOutcome:
    duplicate: bool
    bytes_received: int
    upload_id: str


@dataclass(frozen=True)
class UploadProgress:
    """What the server has of one update: accepted whole, or ``bytes_received`` held so far."""

    accepted: bool
    bytes_received: int
    upload_id: str = ""


@dataclass(frozen=True)
class HeartbeatReply:
    phase: RunPhase
    current_round: int
    round_open: bool
    interval_s: float
