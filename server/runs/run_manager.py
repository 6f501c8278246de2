"""The runs a server hosts, and the face the gRPC servicer and the dashboard talk to.

A single-run server hosts the one run its settings describe (resumed when a crash left it
unfinished) and ends with it. A standing server (``--standing``) starts with no run, or the
unfinished run a restart left, and takes runs submitted over the admin API: each is recorded
*queued* (its settings, its place in submission order) and runs start in that order, **one
active at a time**; when the active run ends (finished, or stopped by the operator) the next
queued one starts. The queue lives in the SQLite store, so a restart keeps it.

Calls are routed by run id: the active run's engine answers its calls; a run that ended answers
DONE and serves its final adapter (:mod:`fedrot_server.runs.ended_runs`); Enroll, when no run takes
the client (none active, the run names other clients, or the client declined it), answers
*wait*. All on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from fedrot_server.runs.control import Activity, LiveStatus
from fedrot_server.runs.ended_runs import EndedRuns
from fedrot_server.errors import NotFoundError, RunSettingsError, WrongStateError
from fedrot_server.runs.hosted_runs import HostedRun, RunSeams, host_run
from fedrot_server.runs.recovery import find_resumable
from fedrot_server.runs.round_state import check_client_info
from fedrot_server.runs.rounds import RoundEngine
from fedrot_server.run_settings import RunSettings, validate_run_settings
from fedrot_server.settings import ServerSettings
from fedrot_server.runs.spec import RunSpec, new_run_id
from fedrot_server.storage.state import RunPhase, RunRow
from fedrot_server.storage.store import SqliteStore
from fedrot_server.runs.tasks import DoneTask, Enrolment, EnrolmentWait, Task, WaitTask
from fedrot_server.runs.worker import EncodedAdapter

logger = logging.getLogger(__name__)
OVER = (RunPhase.FINISHED, RunPhase.STOPPED)


class RunManager:
    """Hosts the server's runs (see the module docstring); ``standing``: take submitted runs
    and keep serving after each."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        store: SqliteStore,
        seams: RunSeams,
        device: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.standing, self.device = settings, settings.standing, device
        self._store, self._seams, self._clock = store, seams, clock
        self._ended = EndedRuns(store, settings.state_dir)
        self._active: HostedRun | None = None
        self._submitted = asyncio.Event()
        self._queue_task: asyncio.Task[None] | None = None

    # Lifecycle.

    async def prepare(self, run_id: str | None = None) -> None:
        """Assemble the first run before anything serves: a single-run server's (resumed, or
        new under ``run_id``), a standing server's unfinished one (if any). SettingsError when
        it cannot be hosted."""
        resumable = find_resumable(self._store, self.settings.resume, run_id, self._clock)
        if not self.standing:
            self._active = await self._assemble(self.settings, run_id, resumable)
        elif resumable is not None:
            self._active = await self._assemble(self._settings_of(resumable), None, resumable)

    async def start(self) -> None:
        """Start the first run's rounds; a standing server then takes its queue."""
        if self._active is not None:
            await self._active.engine.start()
        if self.standing:
            self._queue_task = asyncio.create_task(self._serve_queue(), name="fedrot-run-queue")

    async def wait_ended(self) -> RunPhase:
        """A single-run server: the phase its run ended in (re-raises the error that ended it).
        A standing server: returns only when taking runs failed (and re-raises why)."""
        if self._queue_task is not None:
            await asyncio.shield(self._queue_task)
            raise AssertionError("the run queue never ends on its own")
        return await self.active_engine().wait_ended()

    async def stop(self) -> None:
        """Stop taking runs and stop the active run's rounds (it stays resumable)."""
        task = self._queue_task
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if self._active is not None:
            await self._active.engine.stop()

    async def close(self) -> None:
        """Release the active run's worker and evaluations (after :meth:`stop` and the
        transport)."""
        if self._active is not None:
            await self._active.close()

    @property
    def active(self) -> HostedRun | None:
        return self._active

    def active_engine(self) -> RoundEngine:
        if self._active is None:
            raise WrongStateError("no run is active on this server")
        return self._active.engine

    # The queue (the admin API's RunQueue).

    def submit(self, settings: Mapping[str, Any]) -> str:
        """Queue a run of ``settings`` (RunSettings names); its id. RunSettingsError naming
        each bad setting; WrongStateError on a single-run server."""
        if not self.standing:
            raise WrongStateError("this server runs one run; start it with --standing to take "
                                  "submitted runs")  # fmt: skip
        run = validate_run_settings(dict(settings))
        unknown = sorted(set(run.clients) - self._store.client_names())
        if unknown:
            raise RunSettingsError([("clients", f"no client named {', '.join(unknown)} (clients "
                                                 "come from the server's tokens)")])  # fmt: skip
        run_id = new_run_id()
        spec = RunSpec.from_settings(self.settings, run_id, run).to_dict()
        self._store.queue_run(run_id, spec, run.model_dump(mode="json"), self._clock())
        logger.info("run %s queued (%s rounds of %s)", run_id, run.rounds, run.model.name)
        self._submitted.set()
        return run_id

    async def stop_run(self, run_id: str) -> RunPhase:
        """Cancel a queued run (it is recorded *stopped*, with no round), or stop the active
        one (its clients hear DONE); the phase the run was in. NotFoundError for an unknown
        run; WrongStateError for one that ended."""
        run = self._store.run(run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r}")
        if run.phase is RunPhase.QUEUED:  # cancelled: stopped before it started
            self._store.set_run_phase(run_id, RunPhase.STOPPED, self._clock())
            logger.info("run %s cancelled while queued", run_id)
            return RunPhase.QUEUED
        if self._active is not None and self._active.run_id == run_id:
            phase = self._active.engine.phase
            await self._active.engine.stop_run()
            return phase
        raise WrongStateError(f"run {run_id} is {run.phase.value}: there is nothing to stop")

    async def _serve_queue(self) -> None:
        """Run the queued runs one after another, for as long as the server serves."""
        while True:
            if self._active is not None:
                phase = await self._active.engine.wait_ended()  # a failure ends the queue
                logger.info("run %s %s", self._active.run_id, phase.value)
                retired, self._active = self._active, None
                await retired.close()
            queued = await self._next_queued()
            try:
                await self._host(self._settings_of(queued), queued.run_id)
            except Exception:  # noqa: BLE001 - a run that cannot start must not end the server
                logger.exception("run %s could not start; it is stopped", queued.run_id)
                self._store.set_run_phase(queued.run_id, RunPhase.STOPPED, self._clock())

    async def _next_queued(self) -> RunRow:
        while True:
            self._submitted.clear()
            queued = self._store.queued_runs()
            if queued:
                return queued[0]
            await self._submitted.wait()

    async def _assemble(
        self, settings: ServerSettings, run_id: str | None, resumable: RunRow | None
    ) -> HostedRun:
        return await host_run(settings, store=self._store, seams=self._seams, device=self.device,
                              run_id=run_id, resumable=resumable)  # fmt: skip

    async def _host(self, settings: ServerSettings, run_id: str | None) -> None:
        hosted = await self._assemble(settings, run_id, None)
        try:
            await hosted.engine.start()
        except BaseException:
            await hosted.close()
            raise
        self._active = hosted

    def _settings_of(self, run: RunRow) -> ServerSettings:
        """The effective settings of a recorded run: the server's with the run's (a run
        recorded without them, by a single-run server: the ones given at start)."""
        recorded = self._store.run_settings(run.run_id)
        if recorded is None:
            return self.settings
        return self.settings.for_run(RunSettings.model_validate(recorded))

    # What the servicer calls (the client is already authenticated).

    def enroll(self, client: str, info: Mapping[str, str]) -> Enrolment | EnrolmentWait:
        check_client_info(info)
        hosted = self._active
        if hosted is None:
            return self._wait(client, "no run is active: waiting for one to be submitted")
        engine = hosted.engine
        if not engine.settings.takes(client):
            return self._no_run_for(client, f"run {hosted.run_id} does not take client {client!r}")
        if not engine.takes(client):
            return self._no_run_for(client, f"client {client!r} declined run {hosted.run_id}")
        if self.standing and engine.phase in OVER:
            return self._wait(client, f"run {hosted.run_id} is over: waiting for the next run")
        return engine.enroll(client, info)

    async def next_task(self, client: str, run_id: str, max_wait_s: float | None) -> Task:
        hosted = self._active
        if hosted is not None and hosted.run_id == run_id:
            return self._continuing(await hosted.engine.next_task(client, run_id, max_wait_s))
        return self._continuing(await self._ended.done_task(client, run_id))

    async def adapter_for(self, client: str, run_id: str, round_index: int) -> EncodedAdapter:
        hosted = self._active
        if hosted is not None and hosted.run_id == run_id:
            return hosted.engine.adapter_for(client, run_id, round_index)
        return await self._ended.adapter_for(client, run_id, round_index)

    def count_download(self, run_id: str, round_index: int, size: int) -> None:
        hosted = self._active
        if hosted is not None and hosted.run_id == run_id:
            hosted.engine.count_download(round_index, size)

    def engine_for(self, run_id: str) -> RoundEngine:
        """The engine of ``run_id`` when it is the active run; WrongStateError otherwise."""
        hosted = self._active
        if hosted is None or hosted.run_id != run_id:
            current = f"{hosted.run_id!r}" if hosted is not None else "(none is active)"
            raise WrongStateError(f"run {run_id!r} is not the current run {current}")
        return hosted.engine

    async def decline(self, client: str, run_id: str, reason: str) -> None:
        await self.engine_for(run_id).decline(client, run_id, reason)

    def _no_run_for(self, client: str, reason: str) -> EnrolmentWait:
        """A standing server: wait for the next run. A single-run server has no other run to
        offer: WrongStateError (FAILED_PRECONDITION), so the client ends at once."""
        if not self.standing:
            raise WrongStateError(f"{reason}, and this server runs no other run")
        return self._wait(client, reason)

    def _wait(self, client: str, reason: str) -> EnrolmentWait:
        return EnrolmentWait(client, WaitTask(reason, self.settings.heartbeat_interval_s))

    def _continuing(self, task: Task) -> Task:
        if self.standing and isinstance(task, DoneTask):
            return dataclasses.replace(task, server_continues=True)
        return task

    # The dashboard's RunControl, on the active run.

    def status(self) -> LiveStatus:
        if self._active is None:
            return LiveStatus("", Activity.WAITING, False)
        return self._active.engine.status()

    async def pause(self) -> None:
        await self.active_engine().pause()

    async def resume(self) -> None:
        await self.active_engine().resume()

    async def close_round(self) -> int:
        return await self.active_engine().close_round()

    async def revoke(self, client: str) -> None:
        if self._active is None:
            self._store.revoke_client(client)
        else:
            await self._active.engine.revoke(client)
