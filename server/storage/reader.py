"""Reads of the server's SQLite state: :class:`SqliteReader`, the read-only
:class:`~fedrot_server.storage.state.StateReader` (what the dashboard opens with
:func:`~fedrot_server.storage.store.open_reader`, and the read half that
:class:`~fedrot_server.storage.store.SqliteStore` inherits), and the conversion of its rows.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from fedrot_server.errors import StoreError
from fedrot_server.storage.state import (
    ClientRow,
    MetricRow,
    RoundPhase,
    RoundRow,
    RunPhase,
    RunRow,
    UploadRow,
)

# Runs a restart resumes (a crash left them so); finished and stopped runs stay ended.
UNFINISHED_PHASES = (RunPhase.WAITING, RunPhase.RUNNING)


class SqliteReader:
    """Read-only :class:`~fedrot_server.storage.state.StateReader` over the server's database."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """The rows of a read; a database that cannot be read (damaged, not a database,
        locked past the timeout) is a :class:`StoreError`."""
        try:
            return self._db.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state read failed: {exc}") from exc

    def _query_one(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = self._query(sql, params)
        return rows[0] if rows else None

    def runs(self) -> list[RunRow]:
        """Every run in submission order (queued ones with their place in the queue)."""
        rows = self._query("SELECT * FROM runs ORDER BY created_at, run_id")
        places = self._queue_places()
        return [_run_row(r, places.get(r["run_id"])) for r in rows]

    def run(self, run_id: str) -> RunRow | None:
        row = self._query_one("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return _run_row(row, self._queue_places().get(run_id)) if row else None

    def queued_runs(self) -> list[RunRow]:
        """The runs waiting to start, the next first (submission order)."""
        rows = self._query("SELECT * FROM runs WHERE phase = ?", (RunPhase.QUEUED.value,))
        rows.sort(key=lambda r: (_column(r, "sequence") or 0, r["created_at"]))
        return [_run_row(r, place) for place, r in enumerate(rows, start=1)]

    def _queue_places(self) -> dict[str, int]:
        return {run.run_id: run.queue_position or 0 for run in self.queued_runs()}

    def run_settings(self, run_id: str) -> dict[str, Any] | None:
        """The run's settings as recorded (None: a run recorded before they were kept)."""
        row = self._query_one("SELECT settings FROM runs WHERE run_id = ?", (run_id,))
        return None if row is None or row["settings"] is None else json.loads(row["settings"])

    def client_names(self) -> set[str]:
        """Every client the server knows (revoked ones included)."""
        return {r["name"] for r in self._query("SELECT name FROM clients")}

    def clients(self, run_id: str) -> list[ClientRow]:
        rows = self._query(
            "SELECT e.*, c.revoked FROM enrollments e JOIN clients c ON c.name = e.client "
            "WHERE e.run_id = ? ORDER BY e.client",
            (run_id,),
        )
        return [
            ClientRow(
                name=r["client"],
                enrolled_at=r["enrolled_at"],
                last_seen=r["last_seen"],
                revoked=bool(r["revoked"]),
                info=json.loads(r["info"]),
                declined=_column(r, "declined"),
            )
            for r in rows
        ]

    def rounds(self, run_id: str) -> list[RoundRow]:
        rows = self._query(
            "SELECT * FROM rounds WHERE run_id = ? ORDER BY round_index", (run_id,)
        )
        return [_round_row(r) for r in rows]

    def round_target(self, run_id: str, round_index: int) -> int | None:
        """How many reports complete round ``round_index`` (None when not recorded)."""
        row = self._query_one(
            "SELECT target FROM rounds WHERE run_id = ? AND round_index = ?", (run_id, round_index)
        )
        return row["target"] if row else None

    def unfinished_runs(self) -> list[RunRow]:
        """The runs a crash or a stop left waiting or running, oldest first."""
        rows = self._query(
            "SELECT * FROM runs WHERE phase IN (?, ?) ORDER BY created_at, run_id",
            tuple(p.value for p in UNFINISHED_PHASES),
        )
        return [_run_row(r) for r in rows]

    def latest_unfinished_run(self) -> RunRow | None:
        """The most recent run a crash left waiting or running (None when there is none)."""
        row = self._query_one(
            "SELECT * FROM runs WHERE phase IN (?, ?) ORDER BY created_at DESC, run_id DESC",
            tuple(p.value for p in UNFINISHED_PHASES),
        )
        return _run_row(row) if row else None

    def merged_uploads(self, run_id: str, round_index: int) -> list[UploadRow]:
        """The uploads aggregated into round ``round_index`` (late ones included), in arrival
        order."""
        rows = self._query(
            "SELECT * FROM uploads WHERE run_id = ? AND COALESCE(merged_into, round_index) = ? "
            "ORDER BY sequence",
            (run_id, round_index),
        )
        return [_upload_row(r) for r in rows]

    def uploads(self, run_id: str, round_index: int) -> list[UploadRow]:
        rows = self._query(
            "SELECT * FROM uploads WHERE run_id = ? AND round_index = ? ORDER BY sequence",
            (run_id, round_index),
        )
        return [_upload_row(r) for r in rows]

    def metrics(self, run_id: str) -> list[MetricRow]:
        rows = self._query(
            "SELECT * FROM metrics WHERE run_id = ? ORDER BY round_index, source, name",
            (run_id,),
        )
        return [MetricRow(r["run_id"], r["round_index"], r["source"], r["name"], r["value"])
                for r in rows]  # fmt: skip



def _column(r: sqlite3.Row, name: str) -> Any:
    """``r[name]``; None in a database that predates the column (a reader never adds it)."""
    return r[name] if name in r.keys() else None


def _run_row(r: sqlite3.Row, queue_position: int | None = None) -> RunRow:
    return RunRow(
        run_id=r["run_id"],
        created_at=r["created_at"],
        spec=json.loads(r["spec"]),
        phase=RunPhase(r["phase"]),
        rounds_completed=r["rounds_completed"],
        finished_at=r["finished_at"],
        queue_position=queue_position,
    )


def _round_row(r: sqlite3.Row) -> RoundRow:
    return RoundRow(
        run_id=r["run_id"],
        round_index=r["round_index"],
        phase=RoundPhase(r["phase"]),
        opened_at=r["opened_at"],
        deadline=r["deadline"],
        participants=tuple(json.loads(r["participants"])),
        closed_at=r["closed_at"],
        reporters=tuple(json.loads(r["reporters"])),
        adapter_sha256=r["adapter_sha256"],
        summary=json.loads(r["summary"]),
    )


def _upload_row(r: sqlite3.Row) -> UploadRow:
    return UploadRow(
        run_id=r["run_id"],
        round_index=r["round_index"],
        client=r["client"],
        idempotency_key=r["idempotency_key"],
        sample_count=r["sample_count"],
        size_bytes=r["size_bytes"],
        sha256=r["sha256"],
        received_at=r["received_at"],
        sequence=r["sequence"],
        metrics=json.loads(r["metrics"]),
        merged_into=r["merged_into"],
    )
