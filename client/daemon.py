"""The client daemon: enrol, then download, train, upload, round after round, until DONE.

One :class:`ClientDaemon` serves one run. At start it enrols with its token, loads the run's
base model (refusing a model whose fingerprint differs from the run's), attaches LoRA with the
run's configuration and loads its data. Then it loops on ``GetTask`` (a long poll): for a train
task it downloads the round's global adapter, loads it into the model, trains only the task's
factors (and the head), encodes them with :mod:`fedrot.codec` and uploads them with an
idempotency key that is the same for every retry of the round; a retry, also one after a
restart of the daemon (the update is saved as pending), sends only the bytes the server does
not hold yet (see :mod:`fedrot_client.transport`). Heartbeats go out in the background while
a round is worked on; if the server says the round closed, the round's work is dropped. A
server that restarted with a new run is joined again (a new enrolment). Setting the
``stop`` event (SIGTERM, SIGINT) abandons the current step at the next training step or call;
:meth:`ClientDaemon.run` then returns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedrot.adapters import BOTH_FACTORS, Factor
from fedrot.codec import decode_adapter, encode_adapter
from fedrot_client.errors import Interrupted, RejectedError, TrainingDiverged
from fedrot_client.lora import (
    PEFT_TASK_TYPES,
    load_adapter,
    peft_adapter_config,
    save_peft_directory,
)
from fedrot_client.messages import factor_messages, factors_of, train_config_of
from fedrot_client.session import Session, describe_host, start_session
from fedrot_client.settings import ClientSettings
from fedrot_client.state import ClientState, PendingUpload
from fedrot_client.training import train_locally
from fedrot_client.transport import MAX_CHUNK_BYTES, Transport, sha256_hex
from fedrot_proto.v1 import federation_pb2 as pb

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_CHUNK_BYTES = 1024 * 1024
# Statuses of an upload or download that mean "this round is gone for us", not a fault.
ROUND_GONE = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})
# Statuses of an upload that refuse the update itself (its content, key or size): sending it
# again cannot help, so it is dropped (and the round not trained again).
UPDATE_REFUSED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})
# Statuses of GetTask that mean the server no longer serves our run (it restarted).
RUN_GONE = ROUND_GONE
MAX_REENROLMENTS = 5


@dataclass(frozen=True)
class RoundRecord:
    """One round this client worked on; ``status`` is ``accepted``, ``duplicate`` or
    ``dropped`` (the round closed first, or the server refused it as stale)."""

    round_index: int
    status: str
    num_samples: int = 0
    train_loss: float | None = None
    upload_bytes: int = 0


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


def idempotency_key(run_id: str, client_id: str, round_index: int) -> str:
    """The same for every attempt (and every restart) at one round's update."""
    return hashlib.sha256(f"{run_id}|{client_id}|{round_index}".encode()).hexdigest()[:32]


class Heartbeats:
    """Heartbeats in a background thread while one round is worked on (a context manager).

    ``round_closed`` turns true once the server answers that it no longer accepts this round.
    """

    def __init__(
        self, transport: Transport, run_id: str, round_index: int, interval_s: float
    ) -> None:
        self._transport = transport
        self._run_id = run_id
        self._round = round_index
        self._interval = interval_s
        self._phase = pb.CLIENT_PHASE_DOWNLOADING
        self._progress = 0.0
        self._done = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-round-{round_index}", daemon=True
        )

    @property
    def round_closed(self) -> bool:
        return self._closed.is_set()

    def report(self, phase: int, progress: float) -> None:
        self._phase, self._progress = phase, progress

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self._beat()
            if self._done.wait(self._interval):
                return

    def _beat(self) -> None:
        try:
            reply = self._transport.heartbeat(self._run_id, self._round, self._phase,
                                              self._progress)  # fmt: skip
        except (RejectedError, Interrupted) as exc:
            logger.debug("heartbeat for round %s failed: %s", self._round, exc)
            return
        interval = reply.heartbeat_interval.ToNanoseconds() / 1e9
        if interval > 0:
            self._interval = interval
        if not reply.round_open and not self._closed.is_set():
            logger.warning("the server closed round %s for this client", self._round)
            self._closed.set()


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
        self._state = ClientState(settings.state_dir)
        self._info = dict(info) if info is not None else describe_host(settings)
        self._rounds: list[RoundRecord] = []

    def run(self) -> RunOutcome:
        """Enrol, check the model, serve rounds until DONE (or until stopped).

        If the server stops knowing our run (it restarted with a new one), the daemon enrols
        again and serves the new run, keeping its model when the configuration is the same.
        """
        session: Session | None = None
        failures = 0
        try:
            while True:
                session = self._enroll(session)
                served = len(self._rounds)
                try:
                    return self._serve(session)
                except RejectedError as exc:
                    failures = 0 if len(self._rounds) > served else failures + 1
                    if exc.method != "GetTask" or exc.code not in RUN_GONE:
                        raise
                    if failures > MAX_REENROLMENTS:
                        raise
                    logger.warning("the server no longer serves run %s (%s); enrolling again",
                                   session.run_id, exc.details)  # fmt: skip
                    if self._stop.wait(self.settings.backoff_initial_s):
                        raise Interrupted("stop requested") from exc
        except Interrupted as exc:
            if not self._stop.is_set():
                raise
            logger.info("stopping: %s", exc)
            run_id, client_id = (session.run_id, session.client_id) if session else ("", "")
            return RunOutcome(run_id, client_id, False, tuple(self._rounds), reason="stopped")

    def _enroll(self, previous: Session | None) -> Session:
        enrolment = self._transport.enroll(self._info)
        run = enrolment.run
        logger.info("enrolled in run %s as %s (%s rounds, strategy %s)", run.run_id,
                    enrolment.client_id, run.rounds, run.strategy.name)  # fmt: skip
        self._state.record_enrolment(run.run_id, enrolment.client_id)
        if previous is not None and previous.fits(run):
            return dataclasses.replace(previous, run=run, client_id=enrolment.client_id)
        return start_session(self.settings, enrolment)

    def _serve(self, session: Session) -> RunOutcome:
        self._send_pending(session)
        while True:
            response = self._transport.get_task(session.run_id, self.settings.max_wait_s)
            kind = response.WhichOneof("task")
            if kind == "train":
                self._work_on(session, response.train)
            elif kind == "done":
                return self._finish(session, response.done)
            else:
                delay = response.wait.retry_after.ToNanoseconds() / 1e9 if kind else 1.0
                logger.debug("waiting (%s)", response.wait.reason or "no task")
                if delay > 0 and self._stop.wait(delay):
                    raise Interrupted("stop requested while waiting for a task")

    def _work_on(self, session: Session, task: pb.TrainTask) -> None:
        if task.round in self._state.completed_rounds(session.run_id):
            # Offered again: the server still waits for us (it lost our withdrawal in a restart).
            logger.info("round %s: already done here (update accepted, or given up); waiting "
                        "for the next", task.round)  # fmt: skip
            self._withdraw(session.run_id, task.round)
            if self._stop.wait(self.settings.backoff_initial_s):
                raise Interrupted("stop requested")
            return
        interval = session.run.heartbeat_interval.ToNanoseconds() / 1e9 or DEFAULT_HEARTBEAT_S
        with Heartbeats(self._transport, session.run_id, task.round, interval) as beats:
            try:
                pending, payload = self._train(session, task, beats)
            except Interrupted as exc:
                if self._stop.is_set():
                    raise
                self._rounds.append(RoundRecord(task.round, "dropped"))
                logger.warning("round %s: abandoned (%s)", task.round, exc)
                return
            except RejectedError as exc:
                if exc.code not in ROUND_GONE:
                    raise
                self._rounds.append(RoundRecord(task.round, "dropped"))
                logger.warning("round %s: no longer available (%s)", task.round, exc)
                return
            except TrainingDiverged as exc:
                self._give_up_round(session.run_id, task.round, f"local training diverged: {exc}")
                return
            beats.report(pb.CLIENT_PHASE_UPLOADING, 0.0)
            self._upload(session, pending, payload)

    def _train(
        self, session: Session, task: pb.TrainTask, beats: Heartbeats
    ) -> tuple[PendingUpload, bytes]:
        """Download, load, train, encode; the encoded update is saved as pending."""
        trained = factors_of(task.trained_factors)
        data = self._transport.download_adapter(session.run_id, task.round, task.global_adapter)
        decoded = decode_adapter(data, session.schema, BOTH_FACTORS)
        load_adapter(session.model, decoded.tensors)
        beats.report(pb.CLIENT_PHASE_TRAINING, 0.0)
        config = train_config_of(task.hyperparameters, num_threads=self.settings.num_threads,
                                 progress=self.settings.show_progress())  # fmt: skip

        def on_step(done: int, total: int, loss: float) -> None:
            beats.report(pb.CLIENT_PHASE_TRAINING, done / max(total, 1))
            if self._stop.is_set():
                raise Interrupted("stop requested during local training")
            if beats.round_closed:
                raise Interrupted("the server closed the round during local training")

        started = time.monotonic()
        result = train_locally(session.model, session.tokenizer, session.dataset, trained, config,
                               on_step=on_step)  # fmt: skip
        elapsed = time.monotonic() - started
        logger.info("round %s: trained %s on %s samples in %s steps (%.1fs), loss %.4f",
                    task.round, "+".join(sorted(trained)), result.num_samples, result.steps,
                    elapsed, result.mean_loss)  # fmt: skip
        metadata = {"run_id": session.run_id, "round": str(task.round),
                    "client_id": session.client_id,
                    "factors": "".join(sorted(trained))}  # fmt: skip
        payload = encode_adapter(result.tensors, metadata)
        pending = PendingUpload(
            run_id=session.run_id,
            round_index=task.round,
            idempotency_key=idempotency_key(session.run_id, session.client_id, task.round),
            sample_count=result.num_samples,
            factors=tuple(sorted(trained)),
            sha256=sha256_hex(payload),
            metrics={"train_loss": result.mean_loss, "train_steps": float(result.steps),
                     "train_seconds": elapsed},  # fmt: skip
        )
        self._state.save_pending(pending, payload)
        return pending, payload

    def _send_pending(self, session: Session) -> None:
        """Re-send an update trained before a restart and not yet accepted."""
        found = self._state.pending(session.run_id)
        if found is not None:
            logger.info("round %s: re-sending the update saved before a restart",
                        found[0].round_index)  # fmt: skip
            self._upload(session, *found)

    def _upload(self, session: Session, pending: PendingUpload, payload: bytes) -> None:
        header = pb.UploadHeader(
            run_id=pending.run_id,
            round=pending.round_index,
            sample_count=pending.sample_count,
            metrics=dict(pending.metrics),
            idempotency_key=pending.idempotency_key,
            factors=factor_messages(Factor(f) for f in pending.factors),
        )
        limits = session.run.limits
        chunk = min(limits.chunk_bytes or DEFAULT_CHUNK_BYTES,
                    limits.max_chunk_bytes or MAX_CHUNK_BYTES, MAX_CHUNK_BYTES)  # fmt: skip
        try:
            reply = self._transport.upload_update(header, payload, chunk)
        except RejectedError as exc:
            if exc.code in UPDATE_REFUSED:
                self._give_up_round(pending.run_id, pending.round_index,
                                    f"the server refused the update: {exc}")  # fmt: skip
                return
            if exc.code not in ROUND_GONE:
                raise
            self._state.clear_pending()
            self._rounds.append(RoundRecord(pending.round_index, "dropped"))
            logger.warning("round %s: the server refused the update (%s); dropped",
                           pending.round_index, exc.details)  # fmt: skip
            return
        duplicate = reply.status == pb.UPLOAD_STATUS_DUPLICATE
        self._state.record_completed(pending.run_id, pending.round_index)
        self._state.clear_pending()
        record = RoundRecord(pending.round_index, "duplicate" if duplicate else "accepted",
                             pending.sample_count, pending.metrics.get("train_loss"),
                             len(payload))  # fmt: skip
        self._rounds.append(record)
        logger.info("round %s: update %s (%s bytes, upload %s)", pending.round_index,
                    record.status, len(payload), reply.upload_id)  # fmt: skip

    def _give_up_round(self, run_id: str, round_index: int, why: str) -> None:
        """Drop a round whose update cannot be made or sent, for good: the saved update is
        discarded and the round marked done here, so that neither a retry nor a restart sends
        or trains it again (it would end the same way)."""
        self._state.clear_pending()
        self._state.record_completed(run_id, round_index)
        self._rounds.append(RoundRecord(round_index, "dropped"))
        logger.error("round %s: dropped: %s", round_index, why)
        self._withdraw(run_id, round_index)

    def _withdraw(self, run_id: str, round_index: int) -> None:
        """Tell the server we give up ``round_index`` (so it replaces us rather than waiting);
        best effort: a server that cannot be told replaces us at the deadline all the same."""
        try:
            self._transport.heartbeat(run_id, round_index, pb.CLIENT_PHASE_WITHDRAWN, 0.0)
        except (RejectedError, Interrupted) as exc:
            logger.debug("could not withdraw from round %s: %s", round_index, exc)

    def _finish(self, session: Session, done: pb.DoneTask) -> RunOutcome:
        logger.info("run %s done after %s rounds: %s", session.run_id, done.rounds_completed,
                    done.reason)  # fmt: skip
        folder = None
        if self.settings.final_adapter_dir is not None:
            folder = self._save_final(session, done)
        return RunOutcome(session.run_id, session.client_id, True, tuple(self._rounds), folder,
                          done.reason)  # fmt: skip

    def _save_final(self, session: Session, done: pb.DoneTask) -> Path:
        data = self._transport.download_adapter(
            session.run_id, done.rounds_completed, done.final_adapter
        )
        tensors = decode_adapter(data, session.schema, BOTH_FACTORS).tensors
        config = peft_adapter_config(session.lora, session.model_spec.name,
                                     PEFT_TASK_TYPES[session.model_spec.task],
                                     modules_to_save=session.saved_modules)  # fmt: skip
        assert self.settings.final_adapter_dir is not None
        return save_peft_directory(self.settings.final_adapter_dir, tensors, config)
