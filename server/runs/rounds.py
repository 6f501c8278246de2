"""The round engine: transport-free asyncio orchestration of one federated run.

For each round ``t`` the engine waits until ``min_clients`` live clients have enrolled, samples
``clients_per_round`` of them (seeded by ``(seed, t)``), opens the round with a deadline, and
lets each participant train from the published global adapter. Each upload is verified and
handed to the aggregation worker as it arrives. The round closes when every participant (or
as many clients as were asked for) reported, or at the deadline once ``quorum`` reported.

Deadline without a quorum: the round is *extended*, not restarted. Accepted updates stay
(the reference is unchanged, so they remain valid); the deadline moves by
``round_deadline_s``; each participant that has not reported and has gone silent (not heard
from for ``client_timeout_s``) is replaced by a live client not yet in the round, sampled with
the same seed and the extension number. Silent participants may still report.

Closing: the worker finalises the aggregate, the new global adapter is saved as a PEFT
directory (see :mod:`fedrot_server.storage.artifacts`), evaluated when an evaluator is given, recorded,
logged, and published as the reference of round ``t + 1``. Uploads for any other round are
refused, unless ``late_updates = "stale"``: then an update for round ``t - k`` from a
participant of that round that never reported is aligned to the current reference like any
other and added with weight ``sample_count * staleness_weight ** k`` (when the two rounds train
the same factors). After ``rounds`` rounds every client is told DONE.

Durability: each upload is aggregated (which validates it), spooled and recorded before it is
acknowledged; a restart resumes the run from what was recorded (see
:mod:`fedrot_server.runs.recovery`): the open round is rebuilt by re-feeding its uploads in arrival
order, with participants and target as recorded and a fresh deadline.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fedrot.adapters import Adapter
from fedrot.codec import decode_adapter
from fedrot.strategies import RoundPlan, Strategy
from fedrot_server.storage.artifacts import RunArtifacts, adapter_metadata
from fedrot_server.runs.client_calls import ClientCalls, set_within
from fedrot_server.runs.control import ClientProgress
from fedrot_server.runs.evaluations import RoundEvaluations
from fedrot_server.runs.operations import OperatorActions
from fedrot_server.runs.participants import Roster, sample_participants
from fedrot_server.runs.recovery import Resumption, run_record
from fedrot_server.runs.ledger import RoundLedger
from fedrot_server.runs.round_state import OpenRound
from fedrot_server.runs.round_log import round_summary, with_evaluation
from fedrot_server.settings import ServerSettings
from fedrot_server.runs.spec import Evaluator, InitialModel, RunSpec
from fedrot_server.storage.state import RunPhase
from fedrot_server.storage.store import SqliteStore
from fedrot_server.rpc.transfers import sha256_hex
from fedrot_server.runs.uploads import UploadIntake
from fedrot_server.runs.worker import AggregationWorker, EncodedAdapter

logger = logging.getLogger(__name__)

class RoundEngine(ClientCalls, UploadIntake, OperatorActions):
    """Runs one federated run; the servicer calls the client-facing coroutines (in
    :class:`~fedrot_server.runs.client_calls.ClientCalls`, uploads in
    :class:`~fedrot_server.runs.uploads.UploadIntake`), the dashboard the operator actions
    (:class:`~fedrot_server.runs.operations.OperatorActions`)."""

    def __init__(
        self,
        settings: ServerSettings,
        spec: RunSpec,
        *,
        store: SqliteStore,
        worker: AggregationWorker,
        strategy: Strategy,
        initial: InitialModel,
        artifacts: RunArtifacts,
        evaluator: Evaluator | None = None,
        clock: Callable[[], float] = time.time,
        resumption: Resumption | None = None,
    ) -> None:
        self.settings, self.spec = settings, spec
        self._resumption = resumption
        self._store, self._worker, self._strategy = store, worker, strategy
        self._initial, self._artifacts = initial, artifacts
        self._evaluations = (None if evaluator is None else
                             RoundEvaluations(evaluator, threads=settings.thread_counts()[1]))  # fmt: skip
        self._ledger = RoundLedger(settings, spec.run_id, store=store, worker=worker,
                                   strategy=strategy, artifacts=artifacts)  # fmt: skip
        self._clock = clock
        self._roster = Roster()
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._round: OpenRound | None = None
        self._reference: Adapter = initial.adapter
        self._published: tuple[int, EncodedAdapter] | None = None
        self._bytes_out: dict[int, int] = {}
        self._told_done: set[str] = set()
        self._progress: dict[str, ClientProgress] = {}
        self._declined: dict[str, str] = {}
        self._phase = RunPhase.WAITING
        self._task: asyncio.Task[None] | None = None
        self._rebuilt = asyncio.Event()  # a resumed run's interrupted round takes uploads again

    # Lifecycle.

    async def start(self) -> None:
        """Record the run (or restore a resumed one), publish its adapter, start the rounds. A
        resumed run's interrupted round is rebuilt first: this returns once it takes uploads
        again (or the run ended, failed or was stopped meanwhile). The server calls this before
        its gRPC port serves, so a client never meets that round half rebuilt."""
        if self._resumption is not None:
            await self._restore(self._resumption)
        else:
            record = run_record(self.spec, self._initial, self.settings)
            settings = self.settings.run_settings().model_dump(mode="json")
            self._store.create_run(self.spec.run_id, record, self._clock(), settings)
        if self._published is None:
            encoded = await self._worker.encode(self._reference, self._metadata(None))
            await asyncio.to_thread(self._artifacts.save_adapter, None, encoded.payload)
            self._published = (0, encoded)
        self._task = asyncio.create_task(self._run(), name=f"fedrot-run-{self.spec.run_id}")
        logger.info("run %s %s: %s rounds, strategy %s", self.spec.run_id,
                    "resumed" if self._resumption else "started", self.spec.rounds,
                    self.spec.strategy.name)  # fmt: skip
        if self._resumption is not None and self._resumption.open_round is not None:
            rebuilt = asyncio.ensure_future(self._rebuilt.wait())
            await asyncio.wait({rebuilt, self._task}, return_when=asyncio.FIRST_COMPLETED)
            rebuilt.cancel()

    async def stop(self) -> None:
        """Cancel the rounds. What was recorded stays, and so does the run's phase: the next
        start resumes the run (a restart, a rescheduled pod), unless told ``resume = false``.
        Clients are not told the run is over; they retry until the server is back."""
        await self._cancel_rounds()
        if self._evaluations is not None:
            await self._evaluations.close()

    async def _cancel_rounds(self) -> None:
        task = self._task
        while task is not None and not task.done():
            task.cancel()  # again, should a wait inside have swallowed the first
            await asyncio.wait({task}, timeout=1.0)
        if task is not None and not task.cancelled():
            task.exception()  # seen here; wait_finished re-raises it

    async def wait_ended(self) -> RunPhase:
        """Return the phase the run ended in, finished or stopped by the operator
        (:meth:`stop_run`), once it ended; re-raise the error that ended it early."""
        assert self._task is not None, "start() first"
        await asyncio.wait({self._task})
        if self._task.cancelled():
            if self._phase is RunPhase.STOPPED:
                return self._phase
            raise asyncio.CancelledError  # cancelled by stop(): the server is going down
        self._task.result()
        return self._phase

    def takes(self, client: str) -> bool:
        """Whether ``client`` may join this run: the run names no clients or names it, and it
        did not decline the run."""
        return self.settings.takes(client) and client not in self._declined

    async def wait_finished(self) -> None:
        """Return when the run ended; re-raise the error that ended it early."""
        assert self._task is not None, "start() first"
        await asyncio.shield(self._task)

    async def wait_all_told(self, timeout_s: float) -> bool:
        """After the run: wait (at most ``timeout_s``) until every client was told DONE."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while not self._told_done >= self._roster.names():
            if loop.time() >= end:
                return False
            await set_within(self._changed, end - loop.time())
        return True

    @property
    def phase(self) -> RunPhase:
        return self._phase

    @property
    def reference(self) -> Adapter:
        """The current global adapter (float32, CPU)."""
        return self._reference

    # The rounds.

    async def _run(self) -> None:
        resumed = self._resumption
        first = resumed.rounds_completed if resumed is not None else 0
        try:
            for round_index in range(first, self.spec.rounds):
                if resumed is not None and resumed.open_round is not None and round_index == first:
                    rnd = await self._rebuild_round(resumed)
                    self._rebuilt.set()
                    await self._activate(rnd, f"resumed with {rnd.arrivals} accepted uploads")
                    continue
                await self._wait_for_clients()
                await self._play_round(round_index)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Left as recorded, so that a restart resumes the run rather than starting over.
            logger.exception("run %s failed; it stays resumable from what was recorded",
                             self.spec.run_id)  # fmt: skip
            raise
        if self._evaluations is not None:
            await self._evaluations.drain()  # the last round's scores belong to the run
        self._phase = RunPhase.FINISHED
        self._store.set_run_phase(self.spec.run_id, RunPhase.FINISHED, self._clock())
        logger.info("run %s finished after %s rounds; final adapter in %s", self.spec.run_id,
                    self.spec.rounds, self._artifacts.adapter_dir(self.spec.rounds - 1))  # fmt: skip
        self._notify()

    async def _wait_for_clients(self) -> None:
        while self._paused or len(self._live()) < self.settings.min_clients:
            await set_within(self._changed, self.settings.client_timeout_s)

    async def _play_round(self, round_index: int) -> None:
        plan = self._strategy.plan(round_index)
        live = self._live()
        target = self.settings.clients_per_round.of(len(live))
        chosen = sample_participants(live, target, seed=self.spec.seed, round_index=round_index)
        await self._worker.begin_round(self._reference, plan)
        rnd = self._new_round(plan, target, chosen)
        self._store.open_round(self.spec.run_id, round_index, chosen, self._clock(),
                               self._clock() + self.settings.round_deadline_s, target)  # fmt: skip
        await self._activate(rnd, "opened")

    async def _rebuild_round(self, resumed: Resumption) -> OpenRound:
        """Rebuild the open round a crash interrupted and open it again: participants (less
        those revoked before they reported, as :meth:`revoke` does) and target as recorded, its
        uploads re-fed in arrival order, a fresh deadline from the end of the re-feed."""
        row = resumed.open_round
        assert row is not None
        plan = self._strategy.plan(row.round_index)
        target = resumed.target or len(row.participants)
        reported = {u.row.client for u in resumed.uploads}
        kept = [p for p in row.participants if p in resumed.clients or p in reported]
        rnd = self._new_round(plan, target, kept or row.participants)
        await self._ledger.refeed(rnd, self._reference, ((u.row, u.payload) for u in resumed.uploads))
        rnd.deadline = self._now() + self.settings.round_deadline_s
        self._store.extend_round(self.spec.run_id, rnd.index, rnd.participants,
                                 self._clock() + self.settings.round_deadline_s)  # fmt: skip
        rnd.check_complete()
        return rnd

    def _new_round(self, plan: RoundPlan, target: int, participants: Iterable[str]) -> OpenRound:
        now = self._now()
        return OpenRound(plan=plan, target=target, quorum=self.settings.quorum.of(target),
                         participants=set(participants),
                         deadline=now + self.settings.round_deadline_s, started=now)  # fmt: skip

    async def _activate(self, rnd: OpenRound, how: str) -> None:
        """Publish ``rnd`` as the open round, wait for its reports, close it."""
        self._round, self._phase = rnd, RunPhase.RUNNING
        logger.info("round %s %s: participants %s, trained %s, aligned %s", rnd.index, how,
                    sorted(rnd.participants), "+".join(sorted(rnd.plan.trained)),
                    rnd.plan.aligned or "none")  # fmt: skip
        self._notify()
        await self._await_reports(rnd)
        await self._close_round(rnd)

    async def _await_reports(self, rnd: OpenRound) -> None:
        while True:
            if await set_within(rnd.complete, rnd.deadline - self._now()):
                return
            async with self._lock:
                if len(rnd.reported) >= rnd.quorum or rnd.complete.is_set():
                    return
                self._extend(rnd)

    def _extend(self, rnd: OpenRound) -> None:
        silent, added = rnd.extend(self._live(), seed=self.spec.seed,
                                   deadline=self._now() + self.settings.round_deadline_s)  # fmt: skip
        self._store.extend_round(self.spec.run_id, rnd.index, rnd.participants,
                                 self._clock() + self.settings.round_deadline_s)  # fmt: skip
        logger.warning("round %s: deadline passed with %s of %s required reports; extended "
                       "(extension %s), silent %s replaced by %s", rnd.index, len(rnd.reported),
                       rnd.quorum, rnd.extensions, silent, added)  # fmt: skip
        self._notify()

    async def _close_round(self, rnd: OpenRound) -> None:
        async with self._lock:
            rnd.closed = True
            rnd.partials.clear()
            self._progress = {c: p for c, p in self._progress.items() if p.round_index > rnd.index}
        self._notify()
        await self._ledger.settle(rnd, self._reference)
        finished = await self._worker.finish_round(self._metadata(rnd.index))
        summary = round_summary(rnd.participants, list(rnd.reported.values()), finished,
                                bytes_out=self._bytes_out.get(rnd.index, 0),
                                seconds=self._now() - rnd.started, extensions=rnd.extensions,
                                evaluating=self._evaluations is not None)  # fmt: skip
        report = {"summary": summary, "aggregation": finished.result.report.to_dict()}
        await asyncio.to_thread(self._artifacts.save_round, rnd.index, finished.encoded.payload,
                                report, finished.result.base_deltas)  # fmt: skip
        self._store.close_round(self.spec.run_id, rnd.index, at=self._clock(),
                                reporters=rnd.reported.keys(),
                                adapter_sha256=finished.encoded.sha256, summary=summary)  # fmt: skip
        if not self.settings.keep_uploads:
            await asyncio.to_thread(self._artifacts.drop_uploads, rnd.index)
        self._reference = finished.result.adapter
        self._published = (rnd.index + 1, finished.encoded)
        self._round = None
        logger.info("round %s closed: %s", rnd.index, json.dumps(summary, sort_keys=True))
        if self._evaluations is not None:  # scored while the next round trains
            record = functools.partial(self._record_evaluation, rnd.index, report)
            self._evaluations.submit(rnd.index, finished.result.adapter, record)
        self._notify()

    async def _record_evaluation(
        self, round_index: int, report: Mapping[str, Any], scores: dict[str, float], seconds: float
    ) -> None:
        """Round ``round_index``'s held-out scores into its summary, metrics and report.json."""
        summary = with_evaluation(report["summary"], scores, seconds)
        self._store.update_round_summary(self.spec.run_id, round_index, summary)
        self._store.record_metrics(self.spec.run_id, round_index, "server", scores)
        await asyncio.to_thread(self._artifacts.save_report, round_index,
                                {**report, "summary": summary})  # fmt: skip
        logger.info("round %s evaluated in %.1f s: %s", round_index, seconds,
                    json.dumps(scores, sort_keys=True))  # fmt: skip
        self._notify()

    # Restoring a resumed run, and small pieces.

    async def _restore(self, resumed: Resumption) -> None:
        """Take up a resumed run: its published adapter, its enrolled clients (as live)."""
        payload, done = resumed.published, resumed.rounds_completed
        if done and payload is not None:
            schema = self._initial.schema
            self._reference = await self._worker.run(
                lambda: decode_adapter(payload, schema).to_adapter()
            )
        if payload is not None:
            self._published = (done, EncodedAdapter(payload, sha256_hex(payload)))
        for client in resumed.clients:
            self._roster.touch(client, self._now())
        for row in self._store.clients(self.spec.run_id):
            if row.declined is not None:
                self._declined[row.name] = row.declined
                self._roster.remove(row.name)
        await self._evaluate_unscored()

    async def _evaluate_unscored(self) -> None:
        """Evaluate again the closed rounds whose evaluation a crash or stop cut short."""
        if self._evaluations is None:
            return
        for row in self._store.rounds(self.spec.run_id):
            if row.closed_at is None or not row.summary.get("evaluating"):
                continue
            payload = await asyncio.to_thread(self._artifacts.read_adapter, row.round_index)
            schema = self._initial.schema
            adapter = await self._worker.run(lambda p=payload: decode_adapter(p, schema).to_adapter())
            report = await asyncio.to_thread(self._artifacts.read_report, row.round_index)
            record = functools.partial(self._record_evaluation, row.round_index, report)
            self._evaluations.submit(row.round_index, adapter, record)
            logger.info("round %s: evaluating again (cut short before)", row.round_index)

    def _live(self) -> list[str]:
        return self._roster.live(self._now(), self.settings.client_timeout_s)

    def _seen(self, client: str) -> None:
        self._roster.touch(client, self._now())
        self._store.touch(self.spec.run_id, client, self._clock())

    def _metadata(self, produced_by: int | None) -> dict[str, str]:
        """The header metadata of the adapter round ``produced_by`` makes (None: the initial)."""
        return adapter_metadata(self.spec.run_id, produced_by)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()
