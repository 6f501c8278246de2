"""What the operator sees beyond the round records: refused and interrupted uploads, and bytes
sent to clients.

Three tables in the server's SQLite database, kept apart from :mod:`fedrot_server.storage.store` (the
federation's own state) because nothing in a round depends on them: ``refusals`` (one row per
refused upload: who, for which round, the status name as the reason and the message),
``interruptions`` (one row per upload stream that broke off after its header was accepted: the
bytes it delivered are held for a resume, see :mod:`fedrot_server.rpc.partials`) and ``downloads``
(bytes of global adapters sent, summed per run, round and client).

:class:`TelemetryLog` writes (the server, on its event loop thread, with its own connection;
every write commits at once); :class:`TelemetryReader` reads (the dashboard, read-only).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedrot_server.errors import StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS refusals (
    run_id TEXT NOT NULL,
    round_index INTEGER NOT NULL,
    client TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS refusals_by_run ON refusals (run_id, client, at);
CREATE TABLE IF NOT EXISTS interruptions (
    run_id TEXT NOT NULL,
    round_index INTEGER NOT NULL,
    client TEXT NOT NULL,
    bytes_held INTEGER NOT NULL,
    total_size INTEGER NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS interruptions_by_run ON interruptions (run_id, client, at);
CREATE TABLE IF NOT EXISTS downloads (
    run_id TEXT NOT NULL,
    round_index INTEGER NOT NULL,
    client TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    PRIMARY KEY (run_id, round_index, client)
);
"""
MAX_DETAIL = 500


@dataclass(frozen=True)
class RefusalRow:
    """A refused upload: ``reason`` is the status name (``FAILED_PRECONDITION``, ...),
    ``detail`` the message the client got; ``at`` is Unix seconds."""

    run_id: str
    round_index: int
    client: str
    reason: str
    detail: str
    at: float


@dataclass(frozen=True)
class InterruptionRow:
    """An upload stream that broke off (cut, stalled, cancelled or ended early) after
    ``bytes_held`` of ``total_size`` bytes, which the server holds for a resume while the round
    is open; ``detail`` says how it ended, ``at`` is Unix seconds."""

    run_id: str
    round_index: int
    client: str
    bytes_held: int
    total_size: int
    detail: str
    at: float


@dataclass(frozen=True)
class DownloadRow:
    """Bytes of round ``round_index``'s global adapter sent to ``client`` (summed)."""

    run_id: str
    round_index: int
    client: str
    size_bytes: int


class TelemetryView(Protocol):
    """Read-only telemetry (what the dashboard uses)."""

    def refusals(self, run_id: str) -> list[RefusalRow]: ...

    def interruptions(self, run_id: str) -> list[InterruptionRow]: ...

    def downloads(self, run_id: str) -> list[DownloadRow]: ...


class TelemetryReader:
    """:class:`TelemetryView` over a SQLite connection; empty when the tables do not exist."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection

    def close(self) -> None:
        self._db.close()

    def refusals(self, run_id: str) -> list[RefusalRow]:
        """The run's refused uploads, oldest first."""
        rows = self._select(
            "SELECT run_id, round_index, client, reason, detail, at FROM refusals "
            "WHERE run_id = ? ORDER BY at, rowid",
            (run_id,),
        )
        return [RefusalRow(*row) for row in rows]

    def interruptions(self, run_id: str) -> list[InterruptionRow]:
        """The run's interrupted uploads, oldest first."""
        rows = self._select(
            "SELECT run_id, round_index, client, bytes_held, total_size, detail, at "
            "FROM interruptions WHERE run_id = ? ORDER BY at, rowid",
            (run_id,),
        )
        return [InterruptionRow(*row) for row in rows]

    def downloads(self, run_id: str) -> list[DownloadRow]:
        """Bytes sent per round and client, by round then client."""
        rows = self._select(
            "SELECT run_id, round_index, client, size_bytes FROM downloads WHERE run_id = ? "
            "ORDER BY round_index, client",
            (run_id,),
        )
        return [DownloadRow(*row) for row in rows]

    def _select(self, sql: str, params: tuple[object, ...]) -> list[tuple]:
        try:
            return list(self._db.execute(sql, params))
        except sqlite3.Error as exc:
            if isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc):
                return []  # a database written before telemetry existed
            raise StoreError(f"telemetry read failed: {exc}") from exc


class TelemetryLog(TelemetryReader):
    """Writes telemetry to the database at ``path`` (created with the tables when missing)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(sqlite3.connect(path, isolation_level=None))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def record_refusal(
        self, run_id: str, round_index: int, client: str, reason: str, detail: str, at: float
    ) -> None:
        """Record a refused upload (the detail is cut to 500 characters)."""
        self._write(
            "INSERT INTO refusals VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, round_index, client, reason, detail[:MAX_DETAIL], at),
        )

    def record_interruption(self, row: InterruptionRow) -> None:
        """Record an interrupted upload (the detail is cut to 500 characters)."""
        self._write(
            "INSERT INTO interruptions VALUES (?, ?, ?, ?, ?, ?, ?)",
            (row.run_id, row.round_index, row.client, row.bytes_held, row.total_size,
             row.detail[:MAX_DETAIL], row.at),  # fmt: skip
        )

    def record_download(self, run_id: str, round_index: int, client: str, size_bytes: int) -> None:
        """Add ``size_bytes`` sent to ``client`` of round ``round_index``'s adapter."""
        self._write(
            "INSERT INTO downloads VALUES (?, ?, ?, ?) ON CONFLICT(run_id, round_index, client) "
            "DO UPDATE SET size_bytes = size_bytes + excluded.size_bytes",
            (run_id, round_index, client, size_bytes),
        )

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        try:
            self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"telemetry write failed: {exc}") from exc


def open_telemetry_reader(path: Path) -> TelemetryReader:
    """A read-only view of the telemetry in the database at ``path`` (which must exist)."""
    if not path.is_file():
        raise StoreError(f"no state database at {path}")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    return TelemetryReader(connection)
