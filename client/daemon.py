"""The client daemon: FedRot's built-in trainer, written on the client SDK.

:class:`ClientDaemon` is one user of :class:`fedrot_client.Federation` among others: it joins
the federation, builds the run's model, loads its data, and for every task loads the round's
global adapter, trains only the task's factors (and the head) and submits the result, with
one of :mod:`fedrot_client.trainers`: TRL's ``SFTTrainer`` for causal-LM instruction data
(prompt/completion, chat, Alpaca), the built-in loop for classification and plain text. Everything else (enrolment,
resumable transfers, idempotent uploads, heartbeats, withdrawal, the state folder, backoff,
re-joining a restarted server) is the SDK's. A server that restarted with a run of another
configuration is joined afresh (a new model). Setting the ``stop`` event (SIGTERM, SIGINT)
abandons the current step at the next training step or call; :meth:`ClientDaemon.run` then
returns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedrot_client.data import load_dataset
from fedrot_client.errors import RunChangedError, Stopped
from fedrot_client.connection import describe_host
from fedrot_client.federation import Federation
from fedrot_client.models import TaskKind
from fedrot_client.run_info import RoundRecord
from fedrot_client.settings import ClientSettings
from fedrot_client.instructions import is_instruction_data, load_instructions, use_chat_template
from fedrot_client.trainers import InstructionTrainer, LocalLoopTrainer, RoundTrainer
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
        if self.settings.num_threads is not None:
            torch.set_num_threads(self.settings.num_threads)
        model = fed.build_model()
        trainer = self._trainer(fed)
        for task in fed.tasks():
            trainer.work_on(task, model)
        if self.settings.final_adapter_dir is None:
            return None
        return fed.save_final(self.settings.final_adapter_dir)

    def _trainer(self, fed: Federation) -> RoundTrainer:
        """Instruction tuning (TRL) for causal-LM instruction data; the built-in loop for
        classification and plain text."""
        settings, model = self.settings, fed.run.model
        progress = settings.show_progress()
        if model.task is TaskKind.CAUSAL_LM and is_instruction_data(settings.data,
                                                                     settings.data_split):
            data = load_instructions(settings.data, split=settings.data_split)
            if data.is_chat:
                template = settings.chat_template.read_text() if settings.chat_template else None
                use_chat_template(fed.tokenizer, template, data.source)
            return InstructionTrainer(fed.tokenizer, data, progress=progress)
        classification = model.task is TaskKind.CLASSIFICATION
        vocabulary = settings.label_vocabulary(model.num_labels) if classification else None
        dataset = load_dataset(settings.data, vocabulary=vocabulary,
                               fields=settings.field_names(classification),
                               split=settings.data_split)  # fmt: skip
        return LocalLoopTrainer(fed.tokenizer, dataset, self._stop,
                                num_threads=settings.num_threads, progress=progress)
