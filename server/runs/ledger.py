"""The round ledger: what happens to an upload between its last byte and its acknowledgement.

An upload is first aggregated (the worker decodes and validates it, so a bad one changes
nothing) while its spool file, written as the bytes arrived, is synced to disk; then that file
is moved into the spool (rename, folder fsync) and the upload recorded (a synced SQLite
commit); only then does the engine acknowledge it. The ledger also rebuilds a round's aggregate
from recorded uploads (after a crash, or when recording failed), weighs late updates, and
decides which late updates a round takes (``late_updates = "stale"``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from fedrot.adapters import Adapter
from fedrot.codec import Buffer
from fedrot.aggregation import update_weight
from fedrot.diagnostics import ClientReport
from fedrot.strategies import Strategy
from fedrot_server.storage.artifacts import RunArtifacts
from fedrot_server.runs.round_state import OpenRound, aggregation_id
from fedrot_server.settings import ServerSettings
from fedrot_server.storage.state import UploadRow
from fedrot_server.storage.store import SqliteStore
from fedrot_server.rpc.transfers import ReceivedPayload
from fedrot_server.runs.worker import AggregationWorker

logger = logging.getLogger(__name__)


class RoundLedger:
    """Aggregates, spools and records uploads for the engine (on its event loop)."""

    def __init__(
        self,
        settings: ServerSettings,
        run_id: str,
        *,
        store: SqliteStore,
        worker: AggregationWorker,
        strategy: Strategy,
        artifacts: RunArtifacts,
    ) -> None:
        self._settings, self._run_id = settings, run_id
        self._store, self._worker = store, worker
        self._strategy, self._artifacts = strategy, artifacts

    def weight_of(self, row: UploadRow) -> float:
        """An upload's aggregation weight: its samples, times ``staleness_weight`` per round
        it is late."""
        lateness = row.merged_round - row.round_index
        return update_weight(row.sample_count, lateness, self._settings.staleness_weight)

    async def accept(
        self, rnd: OpenRound, row: UploadRow, payload: ReceivedPayload, reference: Adapter
    ) -> ClientReport:
        """Aggregate ``payload`` into ``rnd`` while its file is synced, move the file into the
        spool, record ``row``, count it in ``rnd``.

        CodecError/SchemaError (a bad upload) leave everything unchanged (the caller discards
        the file). If syncing, spooling or recording fails, the aggregate is rebuilt from
        ``reference`` and the uploads already recorded, and the error propagates (the upload is
        not acknowledged).
        """
        syncing = asyncio.ensure_future(asyncio.to_thread(payload.sink.sync))
        try:
            report = await self._worker.add_update(aggregation_id(row), payload.data,
                                                   self.weight_of(row))  # fmt: skip
        finally:
            await asyncio.wait({syncing})
            syncing.exception()  # seen here; raised below when the update was taken
        try:
            syncing.result()
            await asyncio.to_thread(self._artifacts.publish_upload, payload.sink, rnd.index,
                                    row.client, trained_round=row.round_index)  # fmt: skip
            self._store.record_upload(row)
        except Exception:
            logger.exception("round %s: could not record the upload of %s; rebuilding the "
                             "aggregate without it", rnd.index, row.client)  # fmt: skip
            kept = [(r, await asyncio.to_thread(self._artifacts.read_upload, rnd.index, r.client,
                                                trained_round=r.round_index))
                    for r in rnd.rows()]  # fmt: skip
            await self.refeed(rnd, reference, kept, admit=False)
            raise
        rnd.admit(row)
        rnd.check_complete()
        return report

    async def refeed(
        self,
        rnd: OpenRound,
        reference: Adapter,
        uploads: Iterable[tuple[UploadRow, Buffer]],
        *,
        admit: bool = True,
    ) -> None:
        """Start ``rnd``'s aggregate afresh from ``reference`` and add ``uploads`` in the order
        given (their arrival order); ``admit``: also count them in ``rnd``."""
        await self._worker.begin_round(reference, rnd.plan)
        for row, payload in uploads:
            await self._worker.add_update(aggregation_id(row), payload, self.weight_of(row))
            if admit:
                rnd.admit(row)

    def takes_late(self, client: str, round_index: int, rnd: OpenRound) -> bool:
        """Whether ``rnd`` merges a late update of ``client`` for the closed ``round_index``:
        the stale policy, a participant of that round that never uploaded for it, and the same
        trained factors in both rounds."""
        if self._settings.late_updates != "stale" or rnd.closed or not round_index < rnd.index:
            return False
        row = next((r for r in self._store.rounds(self._run_id)
                    if r.round_index == round_index), None)  # fmt: skip
        if row is None or client not in row.participants:
            return False
        if any(u.client == client for u in self._store.uploads(self._run_id, round_index)):
            return False
        return self._strategy.plan(round_index).trained == rnd.plan.trained
