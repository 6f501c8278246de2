"""What the dashboard reads from: the state, the telemetry, the run folders and (when it runs
inside the server) the live run control. One lock serialises reads of the shared connection.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedrot_server.runs.control import LiveStatus, RunControl
from fedrot_server.dashboard.errors import not_found
from fedrot_server.dashboard.files import RunFiles, ZipCache
from fedrot_server.dashboard.views import RunState
from fedrot_server.storage.state import RoundRow, RunRow, StateReader
from fedrot_server.storage.telemetry import DownloadRow, InterruptionRow, RefusalRow, TelemetryView

CURRENT = "current"


@dataclass
class Sources:
    """``client_timeout_s``: a client not heard from for this long shows as silent."""

    reader: StateReader
    files: RunFiles
    telemetry: TelemetryView | None = None
    control: RunControl | None = None
    client_timeout_s: float = 120.0
    clock: Callable[[], float] = time.time
    lock: threading.Lock = field(default_factory=threading.Lock)
    zips: ZipCache = field(default_factory=ZipCache)

    def runs(self) -> list[RunRow]:
        with self.lock:
            return self.reader.runs()

    def runs_with_rounds(self) -> list[tuple[RunRow, list[RoundRow]]]:
        """Every run with its rounds (for the runs table), oldest first."""
        with self.lock:
            return [(run, self.reader.rounds(run.run_id)) for run in self.reader.runs()]

    def run(self, run_id: str) -> RunRow:
        """The run ``run_id``; ``"current"``: the live run, else the latest one. 404 if none."""
        with self.lock:
            if run_id == CURRENT:
                live = self.control.status().run_id if self.control is not None else None
                runs = self.reader.runs()
                found = next((r for r in runs if r.run_id == live), runs[-1] if runs else None)
            else:
                found = self.reader.run(run_id)
        if found is None:
            raise not_found(f"no run {run_id!r}")
        return found

    def state(self, run_id: str) -> RunState:
        run = self.run(run_id)
        with self.lock:
            rounds = self.reader.rounds(run.run_id)
            uploads = {r.round_index: self.reader.uploads(run.run_id, r.round_index)
                       for r in rounds}  # fmt: skip
            clients = self.reader.clients(run.run_id)
        return RunState(run, rounds, uploads, clients)

    def live(self, run_id: str) -> LiveStatus | None:
        """The live status when this server runs ``run_id`` now."""
        if self.control is None:
            return None
        status = self.control.status()
        return status if status.run_id == run_id else None

    def refusals(self, run_id: str) -> list[RefusalRow]:
        if self.telemetry is None:
            return []
        with self.lock:
            return self.telemetry.refusals(run_id)

    def interruptions(self, run_id: str) -> list[InterruptionRow]:
        if self.telemetry is None:
            return []
        with self.lock:
            return self.telemetry.interruptions(run_id)

    def downloads(self, run_id: str) -> list[DownloadRow]:
        if self.telemetry is None:
            return []
        with self.lock:
            return self.telemetry.downloads(run_id)
