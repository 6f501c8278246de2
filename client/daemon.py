"""The client daemon: FedRot's built-in trainer, written on the client SDK.

:class:`ClientDaemon` is one user of :class:`fedrot_client.Federation` among others: it joins
the federation, checks that its data fits the run (task and label names; a run it does not fit
is declined with one line, see :mod:`fedrot_client.run_data`), builds the run's model, and for
every task loads the round's global adapter, trains only the task's factors (and the head) and
submits the result, with one of :mod:`fedrot_client.trainers`: TRL's ``SFTTrainer`` for
causal-LM instruction data (prompt/completion, chat, Alpaca), the built-in loop for
classification and plain text. Everything else (enrolment, resumable transfers, idempotent
uploads, heartbeats, withdrawal, the state folder, backoff, re-joining a restarted server) is
the SDK's.

The daemon follows the server from run to run (:func:`fedrot_client.following.follow_runs`): when a
run ends and the server continues (a standing server), or after declining a run, it enrols
again, waits for the next run and serves it with a fresh model; ``one_run`` leaves after the
first. A single-run server's end ends the daemon, as does a run declined there
(:class:`~fedrot_client.errors.RunDeclinedError`). Setting the ``stop`` event (SIGTERM, SIGINT)
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

from fedrot_client.connection import describe_host
from fedrot_client.data import TextDataset
from fedrot_client.enrolment import PastRuns
from fedrot_client.errors import DataMismatchError, Stopped
from fedrot_client.federation import Federation
from fedrot_client.instructions import InstructionData, read_chat_template, use_chat_template
from fedrot_client.run_data import load_run_data
from fedrot_client.run_info import RoundRecord
from fedrot_client.following import follow_runs
from fedrot_client.settings import ClientSettings
from fedrot_client.state import run_folder_name
from fedrot_client.trainers import InstructionTrainer, LocalLoopTrainer, RoundTrainer
from fedrot_client.transport import Transport

logger = logging.getLogger(__name__)

__all__ = ["ClientDaemon", "RoundRecord", "RunOutcome"]


@dataclass(frozen=True)
class RunOutcome:
    """How one run ended for the daemon: ``finished`` when the server said DONE; ``reason`` is
    ``done``, ``stopped``, ``declined`` (``declined`` then holds the line) or ``run changed``.
    ``final_adapter_dir`` is set when the final adapter was saved."""

    run_id: str
    client_id: str
    finished: bool
    rounds: tuple[RoundRecord, ...] = ()
    final_adapter_dir: Path | None = None
    reason: str = ""
    declined: str = ""


class ClientDaemon:
    """Serves one client's runs; see the module docstring. ``outcomes`` lists every run it
    took part in, in order."""

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
        self.outcomes: list[RunOutcome] = []
        self._standing = False  # a run ended with server_continues: the server serves many

    def run(self) -> RunOutcome:
        """Serve runs until the server ends, ``one_run`` is done, or a stop; the last run's
        outcome. Raises :class:`~fedrot_client.errors.RunDeclinedError` when the data does
        not fit a run and the server has no other (or ``one_run``)."""
        try:
            for federation in follow_runs(self._open, one_run=self.settings.one_run):
                self.outcomes.append(self._take_part(federation))
        except Stopped:  # while waiting for, or joining, a run
            self.outcomes.append(RunOutcome("", "", False, reason="stopped"))
        return self.outcomes[-1]

    def _open(self, past: PastRuns) -> Federation:
        return Federation(self.settings, self._transport, stop=self._stop, info=self._info,
                          past=past, following=True)  # fmt: skip

    def _take_part(self, federation: Federation) -> RunOutcome:
        folder = None
        with federation as fed:
            folder = self._serve(fed)
        run = federation.run
        if federation.stopped:
            reason = "stopped"
        elif federation.run_changed:
            reason = "run changed"
        elif federation.declined is not None:
            reason = "declined"
        else:
            reason = "done"
            where = f"; final adapter in {folder}" if folder else ""
            logger.info("run %s finished (%s rounds trained here)%s", run.run_id,
                        sum(r.status != "dropped" for r in federation.rounds), where)  # fmt: skip
        return RunOutcome(run.run_id, run.client_id, federation.finished, federation.rounds,
                          folder, reason, federation.declined or "")  # fmt: skip

    def _serve(self, fed: Federation) -> Path | None:
        """Train every task; the final adapter's folder when one is configured. Data that does
        not fit the run declines it."""
        try:
            data = load_run_data(self.settings, fed.run)
        except DataMismatchError as exc:
            fed.decline(str(exc))
            return None
        if self.settings.num_threads is not None:
            torch.set_num_threads(self.settings.num_threads)
        model = fed.build_model()
        trainer = self._trainer(fed, data)
        for task in fed.tasks():
            trainer.work_on(task, model)
        if self.settings.final_adapter_dir is None or not fed.finished:
            return None
        return fed.save_final(self._final_folder(fed))

    def _final_folder(self, fed: Federation) -> Path:
        """The final adapter's folder: a subfolder per run id (``run_folder_name``) while
        following a standing server (one of its runs ended with ``server_continues``), else
        (a single-run server, ``one_run``) ``final_adapter_dir`` itself."""
        base = self.settings.final_adapter_dir
        self._standing = self._standing or fed.server_continues
        if self.settings.one_run or not self._standing:
            return base
        return base / run_folder_name(fed.run.run_id)

    def _trainer(self, fed: Federation, data: InstructionData | TextDataset) -> RoundTrainer:
        """Instruction tuning (TRL) for causal-LM instruction data; the built-in loop for
        classification and plain text."""
        settings = self.settings
        progress = settings.show_progress()
        if isinstance(data, InstructionData):
            if data.is_chat:
                template = read_chat_template(settings.chat_template)
                use_chat_template(fed.tokenizer, template, data.source)
            return InstructionTrainer(fed.tokenizer, data, progress=progress)
        return LocalLoopTrainer(fed.tokenizer, data, self._stop,
                                num_threads=settings.num_threads, progress=progress)
