"""One run as the server hosts it: its spec, round engine, aggregation worker and files.

:func:`host_run` assembles them from the run's effective settings
(:meth:`~fedrot_server.settings.ServerSettings.for_run`) and the model seams: the initial
adapter from the initializer, the evaluator from the evaluator factory, the recorded state when
the run is resumed (:mod:`fedrot_server.runs.recovery`). A single-run server hosts one such run, a
standing server one after another (:mod:`fedrot_server.runs.run_manager`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from fedrot.strategies import StrategyName, build_strategy
from fedrot_server.storage.artifacts import RunArtifacts, peft_config
from fedrot_server.errors import SettingsError
from fedrot_server.runs.recovery import check_compatible, load_resumption, run_record
from fedrot_server.runs.rounds import RoundEngine
from fedrot_server.run_settings import EvaluationSettings
from fedrot_server.settings import ServerSettings
from fedrot_server.runs.spec import Evaluator, InitialModel, Initializer, RunSpec
from fedrot_server.storage.state import RunRow
from fedrot_server.storage.store import SqliteStore
from fedrot_server.runs.worker import ThreadedWorker

logger = logging.getLogger(__name__)

EvaluatorFactory = Callable[[RunSpec, EvaluationSettings], "Evaluator | None"]
"""Builds a run's evaluator from its spec and evaluation settings (None: no evaluation)."""


@dataclass(frozen=True)
class RunSeams:
    """How a run gets its round-0 adapter and its evaluator (tests pass synthetic ones)."""

    initializer: Initializer
    evaluator_for: EvaluatorFactory

    @classmethod
    def fixed(cls, initializer: Initializer, evaluator: Evaluator | None) -> RunSeams:
        """Every run gets ``evaluator``."""
        return cls(initializer, lambda spec, evaluation: evaluator)


@dataclass
class HostedRun:
    spec: RunSpec
    engine: RoundEngine
    worker: ThreadedWorker

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    async def close(self) -> None:
        """Stop the engine (its rounds, its evaluations) and the worker."""
        try:
            await self.engine.stop()
        finally:
            await self.worker.close()


def check_initial(initial: InitialModel, spec: RunSpec) -> None:
    rank = initial.schema.rank
    if rank != spec.lora.rank:
        raise SettingsError(f"lora.rank = {spec.lora.rank}, but the initial adapter has rank {rank}")
    if not initial.adapter.lora:
        raise SettingsError(f"the initial adapter has no LoRA module (targets {spec.lora.target_modules})")


async def host_run(
    settings: ServerSettings,
    *,
    store: SqliteStore,
    seams: RunSeams,
    device: str,
    run_id: str | None,
    resumable: RunRow | None,
) -> HostedRun:
    """Assemble the run of ``settings`` (effective: the server's with the run's fields) under
    ``run_id`` (new when None), resuming ``resumable`` when given. Not started
    (:meth:`RoundEngine.start`). SettingsError when the initial adapter does not fit the
    settings, or the settings that define a resumed run changed."""
    spec = RunSpec.from_settings(settings, resumable.run_id if resumable else run_id)
    initial = await asyncio.to_thread(seams.initializer, spec)
    check_initial(initial, spec)
    if resumable is not None:
        check_compatible(resumable, run_record(spec, initial, settings))
    evaluator = await asyncio.to_thread(seams.evaluator_for, spec, settings.evaluation)
    strategy = build_strategy(spec.strategy.name, spec.strategy_config())
    if spec.strategy.name is StrategyName.FEDEX:
        logger.warning("fedex: the base-weight deltas are saved with each round but protocol "
                       "v1 does not send them to clients, who train on the unchanged base")  # fmt: skip
    worker = ThreadedWorker(strategy, initial.schema, device=device,
                            track_error=settings.track_error,
                            max_abs=settings.max_upload_value,
                            threads=settings.thread_counts()[0],
                            scratch=settings.state_dir)  # fmt: skip
    try:
        config = await asyncio.to_thread(peft_config, spec.model, spec.lora, initial.adapter.extra,
                                         base_model_path=initial.base_model_path)  # fmt: skip
        artifacts = RunArtifacts(settings.state_dir, spec.run_id, config,
                                 delta_scale=spec.lora.alpha / spec.lora.rank)  # fmt: skip
        artifacts.clear_incoming()  # a restarted server holds no part of an upload
        # Before serving the run; on this thread, which owns the store.
        resumption = load_resumption(store, artifacts, resumable) if resumable else None
        engine = RoundEngine(settings, spec, store=store, worker=worker, strategy=strategy,
                             initial=initial, artifacts=artifacts, evaluator=evaluator,
                             resumption=resumption)  # fmt: skip
    except BaseException:
        await worker.close()
        raise
    return HostedRun(spec, engine, worker)
