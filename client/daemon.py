"""The client daemon: FedRot's built-in trainer, written on the client SDK.

:class:`ClientDaemon` is one user of :class:`fedrot_client.Federation` among others: it joins
the federation, builds the run's model, loads its data, and for every task loads the round's
global adapter, trains only the task's factors (and the head) with
:func:`fedrot_client.training.train_locally` and submits the result. Everything else (enrolment,
resumable transfers, idempotent uploads, heartbeats, withdrawal, the state folder, backoff,
re-joining a restarted server) is the SDK's. A server that restarted with a run of another
configuration is joined afresh (a new model). Setting the ``stop`` event (SIGTERM, SIGINT)
abandons the current step at the next training step or call; :meth:`ClientDaemon.run` then
returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedrot_client.data import TextDataset, load_dataset
from fedrot_client.errors import (
    RoundLostError,
    RunChangedError,
    Stopped,
    TrainingDiverged,
)
from fedrot_client.connection import describe_host
from fedrot_client.federation import Federation
from fedrot_client.models import TaskKind
from fedrot_client.run_info import RoundRecord
from fedrot_client.settings import ClientSettings
from fedrot_client.task import Task
from fedrot_client.training import TrainConfig, train_locally
from fedrot_client.transport import Transport

logger = logging.getLogger(__name__)

MAX_RUN_CHANGES = 5

__all__ = ["ClientDaemon", "RoundRecord", "RunOutcome"]


@dataclass(frozen=True)
class RunOutcome:
    """How :meth:`ClientDaemon.run` ended: ``finished`` when the server said DONE, else it was
    stopped. ``final_adapter_dir`` is set when the final adapter was saved."""

    run_id: str
    client_id: str
    finished: bool
    rounds: tuple[RoundRecord, ...] = ()
    final_adapter_dir: Path | None = None
    reason: str = ""


class _RoundClosed(Exception):
    """Raised from a training step once the server closed the task's round."""


class ClientDaemon:
    """Serves one run for one client; see the module docstring."""

    def __init__(
        self,
        settings: ClientSettings,
        transport: Transport,
        *,
        stop: threading.Event | None = None,
        info: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self._transport = transport
        self._stop = stop or threading.Event()
        self._info = dict(info) if info is not None else {
            **describe_host(settings.device), "data": settings.data.name}  # fmt: skip
        self._rounds: list[RoundRecord] = []

    def run(self) -> RunOutcome:
        """Join, check the model, serve rounds until DONE (or until stopped)."""
        for _ in range(MAX_RUN_CHANGES + 1):
            federation = Federation(self.settings, self._transport, stop=self._stop,
                                    info=self._info)  # fmt: skip
            folder = None
            try:
                with federation as fed:
                    folder = self._serve(fed)
            except RunChangedError as exc:
                logger.warning("%s; joining with a new model", exc)
                continue
            except Stopped:
                return RunOutcome("", "", False, tuple(self._rounds), reason="stopped")
            finally:
                self._rounds.extend(federation.rounds)
            run = federation.run
            reason = "stopped" if federation.stopped else "done"
            return RunOutcome(run.run_id, run.client_id, federation.finished,
                              tuple(self._rounds), folder, reason)  # fmt: skip
        raise RunChangedError(f"the server changed its run's configuration {MAX_RUN_CHANGES + 1} "
                              "times in a row; giving up")  # fmt: skip

    def _serve(self, fed: Federation) -> Path | None:
        """Train every task; the final adapter's folder when one is configured."""
        model = fed.build_model()
        dataset = self._load_data(fed)
        for task in fed.tasks():
            self._work_on(task, model, fed.tokenizer, dataset)
        if self.settings.final_adapter_dir is None:
            return None
        return fed.save_final(self.settings.final_adapter_dir)

    def _load_data(self, fed: Federation) -> TextDataset:
        model = fed.run.model
        classification = model.task is TaskKind.CLASSIFICATION
        vocabulary = self.settings.label_vocabulary(model.num_labels) if classification else None
        return load_dataset(self.settings.data, vocabulary=vocabulary,
                            fields=self.settings.field_names(classification),
                            split=self.settings.data_split)  # fmt: skip

    def _work_on(
        self,
        task: Task,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        dataset: TextDataset,
    ) -> None:
        task.load_into(model)
        config = TrainConfig.of_plan(task.training, num_threads=self.settings.num_threads,
                                     progress=self.settings.show_progress())  # fmt: skip

        def on_step(done: int, total: int, _loss: float) -> None:
            if not task.progress(done, total):
                if self._stop.is_set():
                    raise Stopped("stop requested during local training")
                raise _RoundClosed()

        started = time.monotonic()
        try:
            result = train_locally(model, tokenizer, dataset, task.factors, config,
                                   on_step=on_step)  # fmt: skip
        except _RoundClosed:
            task.withdraw("the server closed the round during local training")
            return
        except TrainingDiverged as exc:
            task.withdraw(f"local training diverged: {exc}")
            return
        elapsed = time.monotonic() - started
        logger.info("round %s: trained %s on %s samples in %s steps (%.1fs), loss %.4f",
                    task.round_index, "+".join(sorted(task.factors)), result.num_samples,
                    result.steps, elapsed, result.mean_loss)  # fmt: skip
        metrics = {"train_loss": result.mean_loss, "train_steps": float(result.steps),
                   "train_seconds": elapsed}  # fmt: skip
        try:
            task.submit(result.tensors, num_samples=result.num_samples, metrics=metrics)
        except RoundLostError as exc:
            logger.warning("%s", exc)
