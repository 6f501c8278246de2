"""The client SDK: join a federation, receive each round's task, hand in the update.

::

    import fedrot_client

    with fedrot_client.connect("server:50051", token="...", state_dir="state") as fed:
        model = fed.build_model()
        for task in fed.tasks():
            task.load_into(model)
            ...  # your own training
            task.submit(model, num_samples=n, metrics={"train_loss": loss})
        fed.save_final("final-adapter/")

A :class:`Federation` enrols when its ``with`` block starts (re-sending an update that a
previous process saved but could not deliver), long-polls ``GetTask`` in :meth:`tasks`,
downloads each round's global adapter with resumable, SHA-256-checked transfers, and uploads
updates under the round's idempotency key. A state folder remembers the rounds done, so a
restarted client neither trains a round twice nor loses an update. A server that restarted
with a new run of the same configuration is joined again transparently. SIGTERM and SIGINT
(handled in the main thread) end the ``with`` block quietly: ``fed.stopped`` is then true.

A federation is one run. A standing server with no run for this client yet makes the ``with``
block wait at its start; when a run ends, ``fed.server_continues`` says whether the server
stays up for more, and :func:`fedrot_client.runs` hands out one federation per run. A client
whose data does not fit the run says so with :meth:`Federation.decline`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping

import grpc
from transformers import PreTrainedTokenizerBase

from fedrot.adapters import BOTH_FACTORS, AdapterSchema
from fedrot.codec import decode_adapter
from fedrot_client.enrolment import PastRuns, enroll_in_a_run
from fedrot_client.errors import (
    Interrupted,
    RejectedError,
    RunChangedError,
    Stopped,
    UsageError,
)
from fedrot_client.federation_model import FederationModel
from fedrot_client.heartbeats import Heartbeats
from fedrot_client.messages import factors_of, training_plan_of
from fedrot_client.models import BaseModel
from fedrot_client.run_info import RoundRecord, RunInfo
from fedrot_client.settings import ConnectionSettings
from fedrot_client.signals import StopSignals, raise_stopped
from fedrot_client.ledger import RoundLedger
from fedrot_client.state import ClientState
from fedrot_client.task import Task
from fedrot_client.transport import ROUND_GONE, Transport
from fedrot_proto.v1 import federation_pb2 as pb

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 10.0
MAX_REENROLMENTS = 5


class Federation(FederationModel):
    """One client's membership of one run; see the module docstring (its model, tokenizer and
    final adapter are :class:`~fedrot_client.federation_model.FederationModel`'s). Use it in a
    ``with`` block (it enrols on entry and closes its connection on exit); every method needs
    that."""

    def __init__(
        self,
        settings: ConnectionSettings,
        transport: Transport,
        *,
        stop: threading.Event | None = None,
        info: Mapping[str, str] | None = None,
        owns_transport: bool = False,
        handle_signals: bool = False,
        past: PastRuns | None = None,
        following: bool = False,
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._stop = stop or threading.Event()
        self.ledger = RoundLedger(transport, ClientState(settings.state_dir), self._stop)
        self._info = dict(info or {})
        self._owns_transport = owns_transport
        self._signals = (StopSignals(self._stop, transport, raise_now=lambda: True)
                         if handle_signals else None)  # fmt: skip
        self._phase = "new"
        self._enrolment: pb.EnrollResponse | None = None
        self._run: RunInfo | None = None
        self._current: Task | None = None
        self._done: pb.DoneTask | None = None
        self._base: BaseModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._past = past or PastRuns()  # runs declined or finished before (runs())
        self._following = following
        self._declined: str | None = None
        self.declined_unheard = False  # decline() could not tell the server (it predates it)
        self.stopped = False
        self.run_changed = False  # runs() only: the with block ended on a RunChangedError

    # -- the with block ----------------------------------------------------------------------
    def __enter__(self) -> Federation:
        if self._phase != "new":
            raise UsageError("a Federation is entered once; connect() again for a new one")
        if self._signals is not None:
            self._signals.install()
        try:
            self._join(self._enroll())
            self._phase = "open"
            self.ledger.send_pending()
        except BaseException as exc:
            self._shutdown()
            if isinstance(exc, Interrupted) and self._stop.is_set():
                raise Stopped("stop requested while joining") from exc
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object
                 ) -> bool:  # fmt: skip
        try:
            task = self._current
            if task is not None and not task.ended:
                if task.has_saved_update or not isinstance(exc, Exception | None):
                    task.abandon()  # a stop, or an update saved to send after a restart
                elif exc is None:
                    task.withdraw("the client left the federation without submitting")
                else:
                    task.withdraw(f"{type(exc).__name__}: {exc}")
        finally:
            self._shutdown()
        if isinstance(exc, Stopped):
            self.stopped = True
            logger.info("stopped (%s)", exc)
            return True
        if isinstance(exc, RunChangedError) and self._following:
            self.run_changed = True  # runs() joins the new run with a new federation
            logger.warning("%s", exc)
            return True
        return False

    def _shutdown(self) -> None:
        if self._current is not None:
            self._current.abandon()
        if self._signals is not None:
            self._signals.restore()
        if self._owns_transport:
            self._transport.close()
        self._phase = "closed"

    @property
    def entered(self) -> bool:
        """Whether the ``with`` block has started (it may have ended since)."""
        return self._phase != "new"

    def require_open(self) -> None:
        """Raise :class:`UsageError` outside the ``with`` block."""
        if self._phase != "open":
            raise UsageError("the federation is not open: use it inside "
                             "`with fedrot_client.connect(...) as fed:`")  # fmt: skip

    # -- what the run is ---------------------------------------------------------------------
    @property
    def run(self) -> RunInfo:
        """The run joined: id, rounds, task, base model and fingerprint, LoRA, strategy."""
        if self._run is None:
            raise UsageError("not enrolled yet: use fed.run inside the with block")
        return self._run

    @property
    def schema(self) -> AdapterSchema:
        return self.run.schema

    @property
    def rounds(self) -> tuple[RoundRecord, ...]:
        """The rounds this federation worked on, in order, with their outcome."""
        return tuple(self.ledger.records)

    @property
    def finished(self) -> bool:
        """Whether the server said the run is done (:meth:`tasks` ended)."""
        return self._done is not None

    @property
    def server_continues(self) -> bool:
        """Whether the server said, when the run ended, that it stays up for further runs (a
        standing server: enrol again, e.g. with :func:`fedrot_client.runs`, to join the next)."""
        return self._done is not None and self._done.server_continues

    @property
    def declined(self) -> str | None:
        """Why this client declined the run (:meth:`decline`), or None."""
        return self._declined

    @property
    def stopping(self) -> bool:
        """Whether a stop (SIGTERM, SIGINT) was asked for."""
        return self._stop.is_set()

    # -- rounds ------------------------------------------------------------------------------
    def tasks(self) -> Iterator[Task]:
        """The run's rounds for this client, one :class:`Task` at a time, until the server says
        the run is done (nothing once the run was declined). Long-polls between rounds. Each task must end (``submit`` or
        ``withdraw``) inside the loop body; a body that moves on without either withdraws it,
        and an exception escaping the body withdraws it too (a stop does not)."""
        self.require_open()
        if self._current is not None and not self._current.ended:
            raise UsageError(f"round {self._current.round_index} is still open: end it before "
                             "asking for tasks again")  # fmt: skip
        failures = 0
        while self._done is None and self._declined is None:
            response = self._next_task(failures)
            if response is None:
                failures += 1
                continue
            kind = response.WhichOneof("task")
            if kind == "done":
                self._done = response.done
                logger.info("run %s done after %s rounds: %s", self.run.run_id,
                            response.done.rounds_completed, response.done.reason)  # fmt: skip
            elif kind == "train":
                task = self._open_task(response.train)
                if task is None:
                    continue
                failures = 0
                yield from self._hand_out(task)
            else:
                delay = response.wait.retry_after.ToNanoseconds() / 1e9 if kind else 1.0
                logger.debug("waiting (%s)", response.wait.reason or "no task")
                self._pause(delay)

    def _hand_out(self, task: Task) -> Iterator[Task]:
        self._current = task
        yield task
        if task.ended:
            pass
        elif task.has_saved_update:  # its upload failed: it goes out when offered again
            task.abandon()
        else:
            logger.warning("round %s: the loop body ended without submit() or withdraw()",
                           task.round_index)  # fmt: skip
            task.withdraw("the client's loop moved on without submitting")
        self._current = None

    def _next_task(self, failures: int) -> pb.GetTaskResponse | None:
        """The server's answer to GetTask; None after joining a restarted server's new run."""
        try:
            return self._transport.get_task(self.run.run_id, self._settings.max_wait_s)
        except Interrupted as exc:
            raise_stopped(self._stop, exc)
        except RejectedError as exc:
            if exc.code not in ROUND_GONE or failures >= MAX_REENROLMENTS:
                raise
            logger.warning("the server no longer serves run %s (%s); enrolling again",
                           self.run.run_id, exc.details)  # fmt: skip
        self._pause(self._settings.backoff_initial_s)
        self._rejoin()
        return None

    def _open_task(self, message: pb.TrainTask) -> Task | None:
        """Download the round's adapter and start its heartbeats; None when the round is done
        here already or went away during the download."""
        run = self.run
        if self.ledger.saved_round() == message.round:
            # An update of this round was saved but not delivered (the server was away or
            # refused the call): send it rather than training the round again.
            self.ledger.send_pending()
            return None
        if self.ledger.is_done(message.round):
            # Offered again: the server still waits for us (it lost our withdrawal).
            logger.info("round %s: already done here; waiting for the next", message.round)
            self.ledger.withdraw(message.round)
            self._pause(self._settings.backoff_initial_s)
            return None
        interval = run.heartbeat_interval_s or DEFAULT_HEARTBEAT_S
        beats = Heartbeats(self._transport, run.run_id, message.round, interval).start()
        try:
            data = self._transport.download_adapter(run.run_id, message.round,
                                                    message.global_adapter)  # fmt: skip
            tensors = decode_adapter(data, run.schema, BOTH_FACTORS).tensors
            task = Task(self, message, factors_of(message.trained_factors),
                        training_plan_of(message.hyperparameters), tensors, beats)  # fmt: skip
        except Interrupted as exc:
            beats.stop()
            raise_stopped(self._stop, exc)
        except RejectedError as exc:
            beats.stop()
            if exc.code not in ROUND_GONE:
                raise
            self.ledger.record(RoundRecord(message.round, "dropped"))
            logger.warning("round %s: no longer available (%s)", message.round, exc)
            return None
        except BaseException:
            beats.stop()
            raise
        return task

    # -- the end -----------------------------------------------------------------------------
    def decline(self, reason: str) -> None:
        """Tell the server this client cannot take part in the run (its data does not fit:
        another task, other label names); ``reason`` is one line a person can act on. The
        server stops offering the run to this client; :meth:`tasks` then yields nothing and
        :attr:`declined` holds the reason. A standing server offers the next run later."""
        self.require_open()
        if self._current is not None and not self._current.ended:
            raise UsageError(f"round {self._current.round_index} is still open: end it before "
                             "declining the run")  # fmt: skip
        line = " ".join(reason.split()) or "the client cannot take part"
        try:
            self._transport.decline_run(self.run.run_id, line)
        except Interrupted as exc:
            raise_stopped(self._stop, exc)
        except RejectedError as exc:
            if exc.code not in (*ROUND_GONE, grpc.StatusCode.UNIMPLEMENTED):
                raise
            # UNIMPLEMENTED: a server from before DeclineRun cannot be told (nor offer another
            # run); FAILED_PRECONDITION / NOT_FOUND: the run is over already.
            self.declined_unheard = exc.code == grpc.StatusCode.UNIMPLEMENTED
            logger.warning("could not tell the server that this client declines run %s: %s",
                           self.run.run_id, exc)  # fmt: skip
        self._declined = line
        logger.warning("declined run %s: %s", self.run.run_id, line)

    # -- enrolment ---------------------------------------------------------------------------
    def _enroll(self) -> pb.EnrollResponse:
        """Enrol in a run (waiting while a standing server has none for this client)."""
        enrolment = enroll_in_a_run(self._transport, self._info, self._stop, past=self._past,
                                    least_pause_s=self._settings.backoff_initial_s)  # fmt: skip
        run = enrolment.run
        logger.info("enrolled in run %s as %s (%s rounds, strategy %s)", run.run_id,
                    enrolment.client_id, run.rounds, run.strategy.name)  # fmt: skip
        return enrolment

    def _join(self, enrolment: pb.EnrollResponse) -> None:
        self.ledger.join(enrolment.run.run_id, enrolment.client_id, enrolment.run.limits)
        self._enrolment, self._run = enrolment, RunInfo.of(enrolment)

    def _rejoin(self) -> None:
        """Enrol again after the server forgot our run; the new run must fit the model."""
        enrolment = self._enroll()
        old, new = self._enrolment.run, enrolment.run
        if (new.model, new.lora, new.schema) != (old.model, old.lora, old.schema):
            raise RunChangedError(
                f"the server now runs {new.run_id} with another base model, LoRA or adapter "
                f"schema than {old.run_id}: connect again to join it"
            )
        self._join(enrolment)

    def _pause(self, seconds: float) -> None:
        if seconds > 0 and self._stop.wait(seconds):
            raise Stopped("stop requested while waiting")
