"""The open round's state and the checks an upload must pass before its bytes are read."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fedrot.strategies import RoundPlan
from fedrot_server.errors import InvalidRequestError, TooLargeError, WrongStateError
from fedrot_server.rpc.partials import PartialUploads
from fedrot_server.runs.participants import sample_participants
from fedrot_server.runs.spec import TransferLimits
from fedrot_server.storage.state import UploadRow
from fedrot_server.runs.tasks import UploadRequest
from fedrot_server.rpc.transfers import check_sha256

MAX_METRICS = 64
MAX_KEY_LENGTH = 128
# An aggregation weight: exact as a float64 and far inside SQLite's signed 64-bit INTEGER.
MAX_SAMPLE_COUNT = 2**53


@dataclass
class OpenRound:
    """One round while it runs (owned by the engine, touched on the event loop only).

    ``target`` is how many clients were asked for, ``quorum`` how many reports let the round
    close at its deadline; ``deadline`` and ``started`` are event-loop (monotonic) times.
    ``uploading`` holds the upload slot of each client streaming now, ``partials`` the bytes
    of broken streams (dropped with the round).
    """

    plan: RoundPlan
    target: int
    quorum: int
    participants: set[str]
    deadline: float
    started: float
    reported: dict[str, UploadRow] = field(default_factory=dict)
    withdrawn: set[str] = field(default_factory=set)  # participants that gave the round up
    late: list[UploadRow] = field(default_factory=list)
    uploading: dict[str, asyncio.Event] = field(default_factory=dict)
    partials: PartialUploads = field(default_factory=PartialUploads)
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    extensions: int = 0

    @property
    def index(self) -> int:
        return self.plan.round_index

    def expects(self, client: str) -> bool:
        """Whether an update from ``client`` is still wanted."""
        return (not self.closed and client in self.participants
                and client not in self.reported and client not in self.withdrawn)  # fmt: skip

    @property
    def arrivals(self) -> int:
        """How many uploads (late ones included) were aggregated so far: the next sequence."""
        return len(self.reported) + len(self.late)

    def admit(self, row: UploadRow) -> None:
        """Count an aggregated upload: a participant's report, or a late update."""
        if row.round_index == self.index:
            self.reported[row.client] = row
        else:
            self.late.append(row)

    def rows(self) -> list[UploadRow]:
        """Every aggregated upload in arrival order."""
        return sorted([*self.reported.values(), *self.late], key=lambda row: row.sequence)

    def check_complete(self) -> None:
        """Signal ``complete`` once ``target`` clients reported, or every participant that did
        not withdraw (with at least one update in)."""
        remaining = self.participants - self.withdrawn
        everyone = bool(self.arrivals) and remaining <= self.reported.keys()
        if len(self.reported) >= self.target or everyone:
            self.complete.set()

    def extend(
        self, live: Iterable[str], *, seed: int, deadline: float
    ) -> tuple[list[str], list[str]]:
        """Move the deadline and replace each silent participant (not reported, and not live
        or withdrawn) by a live client not yet in the round, sampled from ``(seed, round,
        extension)``.

        Returns ``(silent, added)``.
        """
        alive = set(live)
        silent = sorted(c for c in self.participants - self.reported.keys()
                        if c not in alive or c in self.withdrawn)  # fmt: skip
        self.extensions += 1
        added = sample_participants(alive - self.participants, len(silent), seed=seed,
                                    round_index=self.index, attempt=self.extensions)  # fmt: skip
        self.participants.update(added)
        self.deadline = deadline
        return silent, added

    def check_accepts(self, client: str, round_index: int) -> None:
        """WrongStateError unless this round takes an update from ``client`` now."""
        if round_index != self.index or self.closed:
            state = "closing" if self.closed else "open"
            raise WrongStateError(
                f"round {round_index} does not accept updates: round {self.index} is {state}"
            )
        if client in self.reported:
            raise WrongStateError(f"client {client!r} already uploaded for round {round_index}")
        if client not in self.participants:
            raise WrongStateError(f"client {client!r} is not a participant of round {round_index}")

    def check_request(self, request: UploadRequest, limits: TransferLimits) -> None:
        """The header's own fields: factors, weight, key, size, digest and metrics."""
        if request.factors != self.plan.trained:
            raise InvalidRequestError(
                f"round {self.index} uploads factors {_names(self.plan.trained)}, "
                f"the header says {_names(request.factors)}"
            )
        if not 1 <= request.sample_count <= MAX_SAMPLE_COUNT:
            raise InvalidRequestError(
                f"sample_count must be in 1..{MAX_SAMPLE_COUNT}, got {request.sample_count}"
            )
        if not 0 < len(request.idempotency_key) <= MAX_KEY_LENGTH:
            raise InvalidRequestError(
                f"idempotency_key must have 1 to {MAX_KEY_LENGTH} characters"
            )
        if request.total_size > limits.max_upload_bytes:
            raise TooLargeError(
                f"upload of {request.total_size} bytes exceeds the limit of "
                f"{limits.max_upload_bytes} bytes"
            )
        check_sha256(request.sha256)
        check_metrics(request.metrics)


def _names(factors: frozenset) -> str:
    return "+".join(str(f) for f in sorted(factors)) or "none"


def no_open_round(round_index: int) -> WrongStateError:
    return WrongStateError(f"round {round_index} does not accept updates: no round is open")


MAX_INFO_ENTRIES, MAX_INFO_TEXT = 32, 256


def check_client_info(info: Mapping[str, str]) -> None:
    """What a client tells about itself at enrolment (host, versions): at most 32 entries of
    at most 256 characters each, so that one client cannot grow the database at will."""
    if len(info) > MAX_INFO_ENTRIES:
        raise InvalidRequestError(f"{len(info)} info entries; at most {MAX_INFO_ENTRIES}")
    for key, value in info.items():
        if len(key) > MAX_INFO_TEXT or len(value) > MAX_INFO_TEXT:
            raise InvalidRequestError(
                f"info entry {key[:40]!r}: keys and values may have at most {MAX_INFO_TEXT} "
                "characters"
            )


def check_metrics(metrics: Mapping[str, float]) -> None:
    """Client metrics: at most 64, names of 1 to 64 characters, finite values."""
    if len(metrics) > MAX_METRICS:
        raise InvalidRequestError(f"{len(metrics)} metrics; at most {MAX_METRICS} are accepted")
    for name, value in metrics.items():
        if not 0 < len(name) <= 64:
            raise InvalidRequestError(f"metric name {name[:80]!r} must have 1 to 64 characters")
        if not math.isfinite(value):
            raise InvalidRequestError(f"metric {name!r} is not finite: {value}")


def derive_seed(seed: int, round_index: int, client: str) -> int:
    """A client's training seed for a round: the same in every process and on every machine."""
    digest = hashlib.sha256(f"fedrot-train:{seed}:{round_index}:{client}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def upload_id(row: UploadRow) -> str:
    return f"{row.run_id}/{row.round_index}/{row.client}"


def aggregation_id(row: UploadRow) -> str:
    """The name an upload has in the aggregator (a late one: ``client@round``)."""
    return row.client if row.merged_into is None else f"{row.client}@{row.round_index}"
