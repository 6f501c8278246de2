"""SQLite state: runs, rounds, clients (tokens stored as SHA-256), uploads and metrics.

One writer (the server process, on its event loop thread) and any number of readers
(:func:`open_reader`, read-only, e.g. the dashboard). WAL journaling lets readers look while
the server writes. Every write commits at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrot_server.errors import ConflictError, NotFoundError, StoreError
from fedrot_server.storage.reader import SqliteReader, _upload_row
from fedrot_server.storage.state import RoundPhase, RunPhase, UploadRow

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    spec TEXT NOT NULL,
    phase TEXT NOT NULL,
    rounds_completed INTEGER NOT NULL DEFAULT 0,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS enrollments (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    client TEXT NOT NULL REFERENCES clients(name),
    enrolled_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    info TEXT NOT NULL,
    PRIMARY KEY (run_id, client)
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round_index INTEGER NOT NULL,
    phase TEXT NOT NULL,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    participants TEXT NOT NULL,
    closed_at REAL,
    reporters TEXT NOT NULL DEFAULT '[]',
    adapter_sha256 TEXT,
    summary TEXT NOT NULL DEFAULT '{}',
    target INTEGER,
    PRIMARY KEY (run_id, round_index)
);
CREATE TABLE IF NOT EXISTS uploads (
    run_id TEXT NOT NULL,
    round_index INTEGER NOT NULL,
    client TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    sample_count INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    received_at REAL NOT NULL,
    sequence INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    merged_into INTEGER,
    PRIMARY KEY (run_id, round_index, client),
    UNIQUE (run_id, client, idempotency_key),
    FOREIGN KEY (run_id, round_index) REFERENCES rounds(run_id, round_index)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    round_index INTEGER NOT NULL,
    source TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (run_id, round_index, source, name)
);
"""
# Columns added after the first release: (table, column, declaration), added when missing.
ADDED_COLUMNS = (
    ("uploads", "merged_into", "INTEGER"),
    ("rounds", "target", "INTEGER"),
    ("clients", "revoked_by", "TEXT"),
    # A run's settings as submitted or given at start (RunSettings JSON), and its place in
    # submission order (what a standing server's queue is ordered by).
    ("runs", "settings", "TEXT"),
    ("runs", "sequence", "INTEGER"),
    # Why the client declined the run (DeclineRun); NULL: it did not.
    ("enrollments", "declined", "TEXT"),
)
# Who revoked a client: the operator (dashboard) or the tokens source, which no longer names it.
REVOKED_BY_OPERATOR = "operator"
REVOKED_BY_TOKENS = "tokens"


@dataclass(frozen=True)
class TokenChanges:
    """What :meth:`SqliteStore.sync_client_tokens` changed, by client name."""

    added: tuple[str, ...] = ()
    rekeyed: tuple[str, ...] = ()
    revoked: tuple[str, ...] = ()
    restored: tuple[str, ...] = ()


def hash_token(token: str) -> str:
    """The stored form of a token: lowercase hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(token.encode()).hexdigest()


def _dumps(value: object) -> str:
    """JSON text; a non-finite float (an undefined relative error) is stored as null."""
    return json.dumps(_finite(value), sort_keys=True, allow_nan=False)


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class SqliteStore(SqliteReader):
    """The server's read-write state. Use from one thread (the event loop's)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(sqlite3.connect(path, isolation_level=None))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        for table, column, declaration in ADDED_COLUMNS:
            columns = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def _write(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, tuple(params))
        except sqlite3.IntegrityError as exc:
            raise ConflictError(f"state conflict: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"state write failed: {exc}") from exc

    # Clients and tokens.

    def sync_client_tokens(self, tokens: Mapping[str, str]) -> TokenChanges:
        """Make the stored clients match ``tokens`` (``name -> token``), the authoritative list.

        New names are added; a name's changed token replaces its old one (tokens may move between
        names: a swap works); a stored name missing from ``tokens`` is revoked and restored when it
        comes back. An operator's revocation (:meth:`revoke_client`) lasts until the client is
        given a new token. One transaction: a failure leaves the clients as they were. Two names
        with one token are the caller's to refuse (a ConflictError here).
        """
        wanted = {name: hash_token(token) for name, token in tokens.items()}
        claimed = set(wanted.values())
        rows = {r["name"]: r for r in self._db.execute("SELECT * FROM clients")}
        changes = TokenChanges(
            added=tuple(sorted(set(wanted) - set(rows))),
            rekeyed=tuple(sorted(n for n in wanted if n in rows and rows[n]["token_sha256"] != wanted[n])),
            revoked=tuple(sorted(n for n in rows if n not in wanted and not rows[n]["revoked"])),
            restored=tuple(sorted(
                n for n in wanted if n in rows and rows[n]["revoked"]
                and (rows[n]["revoked_by"] == REVOKED_BY_TOKENS or rows[n]["token_sha256"] != wanted[n])
            )),
        )  # fmt: skip
        # A removed name keeps its token (its calls are refused as revoked) unless another name
        # now holds it. Every changed row passes through a placeholder that no token hashes to
        # (hashes are hex), so a swap never trips the uniqueness of tokens midway.
        final = {name: wanted.get(name, row["token_sha256"]) for name, row in rows.items()}
        for name in rows:
            if name not in wanted and final[name] in claimed:
                final[name] = f"removed:{name}"
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for name, row in rows.items():
                if final[name] != row["token_sha256"]:
                    self._write("UPDATE clients SET token_sha256 = ? WHERE name = ?",
                                (f"moving:{name}", name))  # fmt: skip
            for name, row in rows.items():
                if final[name] != row["token_sha256"]:
                    self._write("UPDATE clients SET token_sha256 = ? WHERE name = ?",
                                (final[name], name))  # fmt: skip
            for name in changes.added:
                self._write("INSERT INTO clients (name, token_sha256) VALUES (?, ?)",
                            (name, wanted[name]))  # fmt: skip
            for name in changes.revoked:
                self._write("UPDATE clients SET revoked = 1, revoked_by = ? WHERE name = ?",
                            (REVOKED_BY_TOKENS, name))  # fmt: skip
            for name in changes.restored:
                self._write("UPDATE clients SET revoked = 0, revoked_by = NULL WHERE name = ?",
                            (name,))  # fmt: skip
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return changes

    def client_for_token(self, token: str) -> tuple[str, bool] | None:
        """``(name, revoked)`` of the client holding ``token``, or None for an unknown token."""
        row = self._db.execute(
            "SELECT name, revoked FROM clients WHERE token_sha256 = ?", (hash_token(token),)
        ).fetchone()
        return (row["name"], bool(row["revoked"])) if row else None

    def revoke_client(self, name: str) -> None:
        """NotFoundError for an unknown name; StoreError when the write fails."""
        written = self._write(
            "UPDATE clients SET revoked = 1, revoked_by = ? WHERE name = ?", (REVOKED_BY_OPERATOR, name)
        )
        if written.rowcount == 0:
            raise NotFoundError(f"no client named {name!r}")

    # Runs and enrolments.

    def create_run(
        self,
        run_id: str,
        spec: Mapping[str, Any],
        at: float,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a started run, *waiting*: a new row, or the queued row of ``run_id`` (which
        keeps its submission time and place)."""
        if self._write("UPDATE runs SET spec = ?, phase = ? WHERE run_id = ? AND phase = ?",
                       (_dumps(spec), RunPhase.WAITING.value, run_id,
                        RunPhase.QUEUED.value)).rowcount:  # fmt: skip
            return
        self._insert_run(run_id, spec, at, settings, RunPhase.WAITING)

    def queue_run(
        self, run_id: str, spec: Mapping[str, Any], settings: Mapping[str, Any], at: float
    ) -> None:
        """Record a submitted run, *queued* behind every run submitted before it."""
        self._insert_run(run_id, spec, at, settings, RunPhase.QUEUED)

    def _insert_run(self, run_id: str, spec: Mapping[str, Any], at: float,
                    settings: Mapping[str, Any] | None, phase: RunPhase) -> None:  # fmt: skip
        last = self._db.execute("SELECT MAX(sequence) FROM runs").fetchone()[0]
        self._write(
            "INSERT INTO runs (run_id, created_at, spec, phase, settings, sequence) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, at, _dumps(spec), phase.value,
             None if settings is None else _dumps(settings), (last or 0) + 1),
        )  # fmt: skip

    def set_run_phase(self, run_id: str, phase: RunPhase, at: float | None = None) -> None:
        finished = at if phase in (RunPhase.FINISHED, RunPhase.STOPPED) else None
        self._write(
            "UPDATE runs SET phase = ?, finished_at = ? WHERE run_id = ?",
            (phase.value, finished, run_id),
        )

    def enroll(self, run_id: str, client: str, info: Mapping[str, str], at: float) -> None:
        """Enrol ``client`` (again: refreshes its info); keeps the first enrolment time."""
        self._write(
            "INSERT INTO enrollments (run_id, client, enrolled_at, last_seen, info) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(run_id, client) DO UPDATE SET "
            "last_seen = excluded.last_seen, info = excluded.info",
            (run_id, client, at, at, _dumps(dict(info))),
        )

    def decline(self, run_id: str, client: str, reason: str) -> None:
        """Record that ``client`` declined run ``run_id``, and why."""
        self._write("UPDATE enrollments SET declined = ? WHERE run_id = ? AND client = ?",
                    (reason, run_id, client))  # fmt: skip

    def touch(self, run_id: str, client: str, at: float) -> None:
        self._write(
            "UPDATE enrollments SET last_seen = ? WHERE run_id = ? AND client = ?",
            (at, run_id, client),
        )

    # Rounds.

    def open_round(
        self,
        run_id: str,
        round_index: int,
        participants: Iterable[str],
        at: float,
        deadline: float,
        target: int | None = None,
    ) -> None:
        """Record an opened round; ``target``: how many reports complete it."""
        self._write(
            "INSERT INTO rounds (run_id, round_index, phase, opened_at, deadline, participants, "
            "target) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run_id, round_index, RoundPhase.OPEN.value, at, deadline, _dumps(sorted(participants)),
             target),
        )  # fmt: skip
        self._write("UPDATE runs SET phase = ? WHERE run_id = ?", (RunPhase.RUNNING.value, run_id))

    def extend_round(
        self, run_id: str, round_index: int, participants: Iterable[str], deadline: float
    ) -> None:
        self._write(
            "UPDATE rounds SET participants = ?, deadline = ? WHERE run_id = ? AND round_index = ?",
            (_dumps(sorted(participants)), deadline, run_id, round_index),
        )

    def close_round(
        self,
        run_id: str,
        round_index: int,
        *,
        at: float,
        reporters: Iterable[str],
        adapter_sha256: str,
        summary: Mapping[str, Any],
    ) -> None:
        self._write(
            "UPDATE rounds SET phase = ?, closed_at = ?, reporters = ?, adapter_sha256 = ?, "
            "summary = ? WHERE run_id = ? AND round_index = ?",
            (RoundPhase.CLOSED.value, at, _dumps(sorted(reporters)), adapter_sha256,
             _dumps(dict(summary)), run_id, round_index),
        )  # fmt: skip
        self._write(
            "UPDATE runs SET rounds_completed = ? WHERE run_id = ?", (round_index + 1, run_id)
        )

    # Uploads and metrics.

    def record_upload(self, upload: UploadRow) -> None:
        """Record an accepted upload and its metrics in one transaction, synced to disk before
        this returns (the upload is acknowledged after); :class:`ConflictError` on a repeat."""
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._write(
                "INSERT INTO uploads (run_id, round_index, client, idempotency_key, "
                "sample_count, size_bytes, sha256, received_at, sequence, metrics, merged_into) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (upload.run_id, upload.round_index, upload.client, upload.idempotency_key,
                 upload.sample_count, upload.size_bytes, upload.sha256, upload.received_at,
                 upload.sequence, _dumps(dict(upload.metrics)), upload.merged_into),
            )  # fmt: skip
            self.record_metrics(upload.run_id, upload.round_index, upload.client, upload.metrics)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

    def find_upload(self, run_id: str, client: str, idempotency_key: str) -> UploadRow | None:
        row = self._db.execute(
            "SELECT * FROM uploads WHERE run_id = ? AND client = ? AND idempotency_key = ?",
            (run_id, client, idempotency_key),
        ).fetchone()
        return _upload_row(row) if row else None

    def update_round_summary(
        self, run_id: str, round_index: int, summary: Mapping[str, Any]
    ) -> None:
        """Replace a closed round's summary (its held-out scores arrive after it closed)."""
        self._write(
            "UPDATE rounds SET summary = ? WHERE run_id = ? AND round_index = ?",
            (_dumps(summary), run_id, round_index),
        )

    def record_metrics(
        self, run_id: str, round_index: int, source: str, metrics: Mapping[str, float]
    ) -> None:
        """Store the finite values of ``metrics``; a NaN or infinite one (a diverged
        evaluation) is left out, so the round still closes and the chart shows a gap."""
        for name, value in metrics.items():
            if not math.isfinite(float(value)):
                logger.warning("round %s: %s metric %s = %s not recorded", round_index, source,
                               name, value)  # fmt: skip
                continue
            self._write(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?)",
                (run_id, round_index, source, name, float(value)),
            )


def open_reader(path: Path) -> SqliteReader:
    """A read-only view of the database at ``path`` (which must exist)."""
    if not path.is_file():
        raise StoreError(f"no state database at {path}")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    return SqliteReader(connection)

