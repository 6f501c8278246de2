"""The round ledger: what happens to an upload between its last byte and its acknowledgement.

An upload is first checked (decoded and validated off the worker's thread, so a bad one changes
nothing); its spool file, written as the bytes arrived, is then synced and moved into the spool
(rename, folder fsync) and the upload recorded (a synced SQLite commit); then the engine
acknowledges it while the worker aggregates it (queued in arrival order, before the round's
finalisation). Durability does not depend on the aggregation: a crash re-aggregates the
recorded uploads. The ledger also rebuilds a round's aggregate from recorded uploads (after a
crash, or when an aggregation failed), weighs late updates, and decides which late updates a
round takes (``late_updates = "stale"``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable

from fedrot.adapters import Adapter
from fedrot.codec import Buffer
from fedrot.aggregation import update_weight
from fedrot.diagnostics import ClientReport
from fedrot.strategies import Strategy
from fedrot_server.storage.artifacts import RunArtifacts
from fedrot_server.runs.round_log import mean_rotation_distance
from fedrot_server.runs.round_state import OpenRound, aggregation_id
from fedrot_server.settings import ServerSettings
from fedrot_server.storage.state import UploadRow
from fedrot_server.storage.store import SqliteStore
from fedrot_server.rpc.transfers import ReceivedPayload
from fedrot_server.runs.worker import AggregationWorker

logger = logging.getLogger(__name__)


class RoundLedger:
    """Spools, records and aggregates uploads for the engine (on its event loop)."""

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
        self._aggregating: list[asyncio.Future[ClientReport]] = []

    def weight_of(self, row: UploadRow) -> float:
        """An upload's aggregation weight: its samples, times ``staleness_weight`` per round
        it is late."""
        lateness = row.merged_round - row.round_index
        return update_weight(row.sample_count, lateness, self._settings.staleness_weight)

    async def accept(
        self, rnd: OpenRound, row: UploadRow, payload: ReceivedPayload, reference: Adapter
    ) -> None:
        """Check ``payload``, make it durable in the spool, record ``row`` and count it in
        ``rnd``; then queue its aggregation on the worker: the acknowledgement waits for the
        upload to be on disk and recorded, not for its aggregation (a crash after it
        re-aggregates the recorded uploads).

        CodecError/SchemaError (a bad upload) and a failure to sync, spool or record leave
        everything unchanged (nothing was aggregated; the caller discards the file, the upload
        is not acknowledged). An aggregation that fails later (no bad upload gets that far) is
        logged and the round's aggregate rebuilt by :meth:`settle` before the round closes.
        """
        update = await self._worker.check_update(payload.data, rnd.plan.trained)
        await asyncio.to_thread(self._artifacts.publish_upload, payload.sink, rnd.index,
                                row.client, trained_round=row.round_index)  # fmt: skip
        self._store.record_upload(row)
        rnd.admit(row)
        aggregating = self._worker.queue_update(aggregation_id(row), update, self.weight_of(row))
        aggregating.add_done_callback(functools.partial(_log_aggregated, rnd.index, row.client))
        self._aggregating.append(aggregating)
        rnd.check_complete()

    async def settle(self, rnd: OpenRound, reference: Adapter) -> None:
        """Wait for the aggregations :meth:`accept` queued; if one failed, rebuild ``rnd``'s
        aggregate from ``reference`` and its recorded uploads (read from the spool), which
        raises if that fails too."""
        pending, self._aggregating = self._aggregating, []
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        if not any(isinstance(o, BaseException) for o in outcomes):
            return
        logger.error("round %s: an accepted upload failed to aggregate; rebuilding the round's "
                     "aggregate from its recorded uploads", rnd.index)  # fmt: skip
        kept = [(r, await asyncio.to_thread(self._artifacts.read_upload, rnd.index, r.client,
                                            trained_round=r.round_index))
                for r in rnd.rows()]  # fmt: skip
        await self.refeed(rnd, reference, kept, admit=False)

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


def _log_aggregated(round_index: int, client: str, done: asyncio.Future[ClientReport]) -> None:
    if done.cancelled():
        return
    error = done.exception()
    if error is not None:
        logger.error("round %s: the upload of %s failed to aggregate: %r", round_index, client,
                     error)  # fmt: skip
        return
    logger.info("round %s: aggregated the upload of %s, rotation distance %s", round_index,
                client, mean_rotation_distance(done.result().rotations))  # fmt: skip
