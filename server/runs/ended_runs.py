"""What a standing server still answers about runs that ended: DONE, and the final adapter.

A client that heard DONE downloads the run's final adapter right after, possibly while the next
run already trains; a client that was away asks for a task of the run it knew. Both are
answered from the records and the run's folder (``runs/<run_id>/``), which outlive the run's
engine, for as long as the server is up.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from pathlib import Path

from fedrot_server.storage.artifacts import RunArtifacts
from fedrot_server.errors import NotFoundError, WrongStateError
from fedrot_server.storage.state import RunPhase
from fedrot_server.storage.store import SqliteStore
from fedrot_server.runs.tasks import AdapterRef, DoneTask
from fedrot_server.rpc.transfers import sha256_hex
from fedrot_server.runs.worker import EncodedAdapter

ENDED = {RunPhase.FINISHED: "the run is finished", RunPhase.STOPPED: "the run was stopped"}
CACHED_ADAPTERS = 4  # final adapters kept in memory (the latest ended runs')


class EndedRuns:
    """DONE tasks and final adapters of ended runs, read from ``store`` and ``state_dir``.
    Use on the event loop (the store's thread); files are read on a worker thread."""

    def __init__(self, store: SqliteStore, state_dir: Path) -> None:
        self._store, self._state_dir = store, state_dir
        self._adapters: OrderedDict[str, tuple[int, EncodedAdapter]] = OrderedDict()

    async def done_task(self, client: str, run_id: str) -> DoneTask:
        """DONE for ``run_id``'s ``client``: the rounds completed and the final adapter."""
        phase = self._check(client, run_id)
        round_index, encoded = await self._final(run_id)
        ref = AdapterRef(round_index, encoded.size, encoded.sha256)
        return DoneTask(round_index, ref, ENDED[phase])

    async def adapter_for(self, client: str, run_id: str, round_index: int) -> EncodedAdapter:
        """The final adapter of ``run_id`` (``round_index`` = its rounds completed)."""
        self._check(client, run_id)
        final, encoded = await self._final(run_id)
        if round_index != final:
            raise WrongStateError(f"run {run_id} is over; its final adapter is round {final}'s")
        return encoded

    def _check(self, client: str, run_id: str) -> RunPhase:
        run = self._store.run(run_id)
        if run is None or run.phase not in ENDED:
            raise WrongStateError(f"run {run_id!r} is not the current run, nor one that ended "
                                  "on this server")  # fmt: skip
        if all(row.name != client for row in self._store.clients(run_id)):
            raise NotFoundError(f"client {client!r} has not enrolled in run {run_id}")
        return run.phase

    async def _final(self, run_id: str) -> tuple[int, EncodedAdapter]:
        cached = self._adapters.get(run_id)
        if cached is None:
            run = self._store.run(run_id)
            assert run is not None
            done = run.rounds_completed
            artifacts = RunArtifacts(self._state_dir, run_id, {})
            payload = await asyncio.to_thread(artifacts.read_adapter, done - 1 if done else None)
            cached = (done, EncodedAdapter(payload, sha256_hex(payload)))
            self._adapters[run_id] = cached
            while len(self._adapters) > CACHED_ADAPTERS:
                self._adapters.popitem(last=False)
        self._adapters.move_to_end(run_id)
        return cached
