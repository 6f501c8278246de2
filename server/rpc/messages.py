"""Protocol messages <-> the engine's dataclasses (``fedrot.v1``). No logic beyond mapping, and
refusing (InvalidRequestError naming the field) what does not map: an enum number the protocol
does not define, a factor listed twice, a progress that is no fraction."""

from __future__ import annotations

import math
from collections.abc import Iterable

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from fedrot.adapters import AdapterSchema, Factor
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.errors import InvalidRequestError
from fedrot_server.runs.spec import RunSpec
from fedrot_server.storage.state import RunPhase
from fedrot_server.runs.tasks import (
    AdapterRef,
    DoneTask,
    Enrolment,
    EnrolmentWait,
    HeartbeatReply,
    Task,
    TrainTask,
    UploadIdentity,
    UploadOutcome,
    UploadProgress,
    UploadRequest,
    WaitTask,
)
from fedrot_server.runs.worker import EncodedAdapter

FACTORS = {Factor.A: pb.FACTOR_A, Factor.B: pb.FACTOR_B}
FACTORS_BACK = {number: factor for factor, number in FACTORS.items()}
MODEL_TASKS = {"classification": pb.MODEL_TASK_CLASSIFICATION, "causal-lm": pb.MODEL_TASK_CAUSAL_LM}
RUN_STATUS = {
    RunPhase.WAITING: pb.RUN_STATUS_WAITING_FOR_CLIENTS,
    RunPhase.RUNNING: pb.RUN_STATUS_RUNNING,
    RunPhase.FINISHED: pb.RUN_STATUS_FINISHED,
    RunPhase.STOPPED: pb.RUN_STATUS_FINISHED,
    RunPhase.QUEUED: pb.RUN_STATUS_WAITING_FOR_CLIENTS,
}


def duration(seconds: float) -> Duration:
    message = Duration()
    message.FromNanoseconds(round(seconds * 1e9))
    return message


def timestamp(unix_seconds: float) -> Timestamp:
    message = Timestamp()
    message.FromNanoseconds(round(unix_seconds * 1e9))
    return message


def factor_numbers(factors: Iterable[Factor]) -> list[int]:
    return [FACTORS[f] for f in sorted(factors)]


def factors_of(numbers: Iterable[int]) -> frozenset[Factor]:
    """Protocol factor numbers -> Factors; FACTOR_UNSPECIFIED, unknown or repeated numbers are
    refused."""
    out: set[Factor] = set()
    for number in numbers:
        if number not in FACTORS_BACK:
            raise InvalidRequestError(f"factor {number} is not FACTOR_A or FACTOR_B")
        if FACTORS_BACK[number] in out:
            raise InvalidRequestError(f"factors: {pb.Factor.Name(number)} is listed twice")
        out.add(FACTORS_BACK[number])
    return frozenset(out)


def check_heartbeat(request: pb.HeartbeatRequest) -> None:
    """A heartbeat's phase must be a ``ClientPhase`` value, its progress a fraction in [0, 1]."""
    if request.phase not in pb.ClientPhase.values():
        raise InvalidRequestError(f"heartbeat phase {request.phase} is not a ClientPhase value")
    if not (math.isfinite(request.progress) and 0.0 <= request.progress <= 1.0):
        raise InvalidRequestError(
            f"heartbeat progress must be a fraction in [0, 1], got {request.progress}"
        )


def phase_name(phase: int) -> str:
    """``CLIENT_PHASE_TRAINING`` -> ``"training"``; ``""`` for UNSPECIFIED."""
    if phase == pb.CLIENT_PHASE_UNSPECIFIED:
        return ""
    return pb.ClientPhase.Name(phase).removeprefix("CLIENT_PHASE_").lower()


def schema_message(schema: AdapterSchema) -> pb.AdapterSchema:
    return pb.AdapterSchema(
        rank=schema.rank,
        modules=[pb.ModuleShape(name=m, d_out=o, d_in=i) for m, (o, i) in sorted(schema.modules.items())],
        extra=[pb.ExtraShape(key=k, shape=list(s)) for k, s in sorted(schema.extra.items())],
    )


def run_spec_message(spec: RunSpec, schema: AdapterSchema, fingerprint: str) -> pb.RunSpec:
    model, lora, strategy = spec.model, spec.lora, spec.strategy
    return pb.RunSpec(
        run_id=spec.run_id,
        model=pb.ModelSpec(name=model.name, task=MODEL_TASKS[model.task],
                           num_labels=model.num_labels, seed=model.seed,
                           fingerprint=model.fingerprint or fingerprint,
                           label_names=model.labels),  # fmt: skip
        lora=pb.LoraConfig(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                           target_modules=lora.target_modules,
                           modules_to_save=lora.modules_to_save),  # fmt: skip
        strategy=pb.StrategySpec(name=str(strategy.name),
                                 alignment_strength=strategy.alignment_strength,
                                 odd_round_factor=strategy.odd_round_factor, seed=spec.seed),  # fmt: skip
        schema=schema_message(schema),
        limits=pb.TransferLimits(max_chunk_bytes=spec.limits.max_chunk_bytes,
                                 chunk_bytes=spec.limits.chunk_bytes,
                                 max_upload_bytes=spec.limits.max_upload_bytes),  # fmt: skip
        rounds=spec.rounds,
        heartbeat_interval=duration(spec.heartbeat_interval_s),
    )


def enroll_response(enrolment: Enrolment | EnrolmentWait) -> pb.EnrollResponse:
    if isinstance(enrolment, EnrolmentWait):
        return pb.EnrollResponse(client_id=enrolment.client_id, wait=wait_message(enrolment.wait))
    return pb.EnrollResponse(
        client_id=enrolment.client_id,
        run=run_spec_message(enrolment.spec, enrolment.schema, enrolment.fingerprint),
        run_status=RUN_STATUS[enrolment.phase],
    )


def adapter_ref(ref: AdapterRef) -> pb.AdapterRef:
    return pb.AdapterRef(round=ref.round_index, size_bytes=ref.size, sha256=ref.sha256)


def task_response(task: Task) -> pb.GetTaskResponse:
    if isinstance(task, WaitTask):
        return pb.GetTaskResponse(wait=wait_message(task))
    if isinstance(task, DoneTask):
        done = pb.DoneTask(rounds_completed=task.rounds_completed, reason=task.reason,
                           final_adapter=adapter_ref(task.final_adapter),
                           server_continues=task.server_continues)  # fmt: skip
        return pb.GetTaskResponse(done=done)
    return pb.GetTaskResponse(train=train_message(task))


def wait_message(task: WaitTask) -> pb.WaitTask:
    return pb.WaitTask(retry_after=duration(task.retry_after_s), reason=task.reason)


def train_message(task: TrainTask) -> pb.TrainTask:
    t = task.training
    hyperparameters = pb.TrainingHyperparameters(
        local_steps=t.local_steps, epochs=t.epochs, batch_size=t.batch_size,
        learning_rate=t.learning_rate, optimizer=t.optimizer, weight_decay=t.weight_decay,
        max_length=t.max_length, seed=task.seed,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler=t.lr_scheduler,
        warmup_ratio=t.warmup_ratio, max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing, mixed_precision=t.mixed_precision,
    )  # fmt: skip
    return pb.TrainTask(
        round=task.round_index,
        trained_factors=factor_numbers(task.trained),
        hyperparameters=hyperparameters,
        deadline=timestamp(task.deadline),
        time_left=duration(task.time_left_s),
        global_adapter=adapter_ref(task.adapter),
    )


def upload_request(header: pb.UploadHeader) -> UploadRequest:
    return UploadRequest(
        run_id=header.run_id,
        round_index=header.round,
        sample_count=header.sample_count,
        total_size=header.total_size,
        sha256=header.sha256,
        idempotency_key=header.idempotency_key,
        factors=factors_of(header.factors),
        metrics=dict(header.metrics),
    )


def upload_response(outcome: UploadOutcome) -> pb.UploadUpdateResponse:
    status = pb.UPLOAD_STATUS_DUPLICATE if outcome.duplicate else pb.UPLOAD_STATUS_ACCEPTED
    return pb.UploadUpdateResponse(
        status=status, bytes_received=outcome.bytes_received, upload_id=outcome.upload_id
    )


def upload_identity(request: pb.QueryUploadRequest) -> UploadIdentity:
    return UploadIdentity(request.round, request.idempotency_key, request.total_size,
                          request.sha256)  # fmt: skip


def query_response(progress: UploadProgress) -> pb.QueryUploadResponse:
    status = pb.UPLOAD_STATUS_ACCEPTED if progress.accepted else pb.UPLOAD_STATUS_UNSPECIFIED
    return pb.QueryUploadResponse(
        bytes_received=progress.bytes_received, status=status, upload_id=progress.upload_id
    )


def download_header(encoded: EncodedAdapter, chunk_bytes: int) -> pb.DownloadAdapterResponse:
    header = pb.TransferHeader(total_size=encoded.size, sha256=encoded.sha256,
                               chunk_bytes=chunk_bytes)  # fmt: skip
    return pb.DownloadAdapterResponse(header=header)


def download_chunk(offset: int, data: bytes) -> pb.DownloadAdapterResponse:
    return pb.DownloadAdapterResponse(chunk=pb.Chunk(offset=offset, data=data))


def heartbeat_response(reply: HeartbeatReply) -> pb.HeartbeatResponse:
    return pb.HeartbeatResponse(
        run_status=RUN_STATUS[reply.phase],
        current_round=reply.current_round,
        round_open=reply.round_open,
        heartbeat_interval=duration(reply.interval_s),
    )


MAX_DECLINE_REASON = 1000


def decline_reason(request: pb.DeclineRunRequest) -> str:
    """The reason of a DeclineRun on one line; longer than MAX_DECLINE_REASON is refused."""
    if len(request.reason) > MAX_DECLINE_REASON:
        raise InvalidRequestError(f"decline reason: {len(request.reason)} characters, at most "
                                  f"{MAX_DECLINE_REASON}")  # fmt: skip
    reason = " ".join(request.reason.split())
    return reason or "no reason given"
