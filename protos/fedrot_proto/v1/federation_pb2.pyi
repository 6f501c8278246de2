import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Factor(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACTOR_UNSPECIFIED: _ClassVar[Factor]
    FACTOR_A: _ClassVar[Factor]
    FACTOR_B: _ClassVar[Factor]

class ModelTask(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_TASK_UNSPECIFIED: _ClassVar[ModelTask]
    MODEL_TASK_CLASSIFICATION: _ClassVar[ModelTask]
    MODEL_TASK_CAUSAL_LM: _ClassVar[ModelTask]

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_WAITING_FOR_CLIENTS: _ClassVar[RunStatus]
    RUN_STATUS_RUNNING: _ClassVar[RunStatus]
    RUN_STATUS_FINISHED: _ClassVar[RunStatus]

class ClientPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLIENT_PHASE_UNSPECIFIED: _ClassVar[ClientPhase]
    CLIENT_PHASE_IDLE: _ClassVar[ClientPhase]
    CLIENT_PHASE_DOWNLOADING: _ClassVar[ClientPhase]
    CLIENT_PHASE_TRAINING: _ClassVar[ClientPhase]
    CLIENT_PHASE_UPLOADING: _ClassVar[ClientPhase]
    CLIENT_PHASE_WITHDRAWN: _ClassVar[ClientPhase]

class UploadStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPLOAD_STATUS_UNSPECIFIED: _ClassVar[UploadStatus]
    UPLOAD_STATUS_ACCEPTED: _ClassVar[UploadStatus]
    UPLOAD_STATUS_DUPLICATE: _ClassVar[UploadStatus]
FACTOR_UNSPECIFIED: Factor
FACTOR_A: Factor
FACTOR_B: Factor
MODEL_TASK_UNSPECIFIED: ModelTask
MODEL_TASK_CLASSIFICATION: ModelTask
MODEL_TASK_CAUSAL_LM: ModelTask
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_WAITING_FOR_CLIENTS: RunStatus
RUN_STATUS_RUNNING: RunStatus
RUN_STATUS_FINISHED: RunStatus
CLIENT_PHASE_UNSPECIFIED: ClientPhase
CLIENT_PHASE_IDLE: ClientPhase
CLIENT_PHASE_DOWNLOADING: ClientPhase
CLIENT_PHASE_TRAINING: ClientPhase
CLIENT_PHASE_UPLOADING: ClientPhase
CLIENT_PHASE_WITHDRAWN: ClientPhase
UPLOAD_STATUS_UNSPECIFIED: UploadStatus
UPLOAD_STATUS_ACCEPTED: UploadStatus
UPLOAD_STATUS_DUPLICATE: UploadStatus

class ModelSpec(_message.Message):
    __slots__ = ("name", "task", "num_labels", "seed", "fingerprint", "label_names")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: ModelTask
    num_labels: int
    seed: int
    fingerprint: str
    label_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., task: _Optional[_Union[ModelTask, str]] = ..., num_labels: _Optional[int] = ..., seed: _Optional[int] = ..., fingerprint: _Optional[str] = ..., label_names: _Optional[_Iterable[str]] = ...) -> None: ...

class LoraConfig(_message.Message):
    __slots__ = ("rank", "alpha", "dropout", "target_modules", "modules_to_save")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MODULES_TO_SAVE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    modules_to_save: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., modules_to_save: _Optional[_Iterable[str]] = ...) -> None: ...

class StrategySpec(_message.Message):
    __slots__ = ("name", "alignment_strength", "odd_round_factor", "seed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    ODD_ROUND_FACTOR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    name: str
    alignment_strength: float
    odd_round_factor: str
    seed: int
    def __init__(self, name: _Optional[str] = ..., alignment_strength: _Optional[float] = ..., odd_round_factor: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class ModuleShape(_message.Message):
    __slots__ = ("name", "d_out", "d_in")
    NAME_FIELD_NUMBER: _ClassVar[int]
    D_OUT_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    name: str
    d_out: int
    d_in: int
    def __init__(self, name: _Optional[str] = ..., d_out: _Optional[int] = ..., d_in: _Optional[int] = ...) -> None: ...

class ExtraShape(_message.Message):
    __slots__ = ("key", "shape")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    key: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, key: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class AdapterSchema(_message.Message):
    __slots__ = ("rank", "modules", "extra")
    RANK_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    rank: int
    modules: _containers.RepeatedCompositeFieldContainer[ModuleShape]
    extra: _containers.RepeatedCompositeFieldContainer[ExtraShape]
    def __init__(self, rank: _Optional[int] = ..., modules: _Optional[_Iterable[_Union[ModuleShape, _Mapping]]] = ..., extra: _Optional[_Iterable[_Union[ExtraShape, _Mapping]]] = ...) -> None: ...

class TransferLimits(_message.Message):
    __slots__ = ("max_chunk_bytes", "chunk_bytes", "max_upload_bytes")
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_chunk_bytes: int
    chunk_bytes: int
    max_upload_bytes: int
    def __init__(self, max_chunk_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., max_upload_bytes: _Optional[int] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("run_id", "model", "lora", "strategy", "schema", "limits", "rounds", "heartbeat_interval")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model: ModelSpec
    lora: LoraConfig
    strategy: StrategySpec
    schema: AdapterSchema
    limits: TransferLimits
    rounds: int
    heartbeat_interval: _duration_pb2.Duration
    def __init__(self, run_id: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., strategy: _Optional[_Union[StrategySpec, _Mapping]] = ..., schema: _Optional[_Union[AdapterSchema, _Mapping]] = ..., limits: _Optional[_Union[TransferLimits, _Mapping]] = ..., rounds: _Optional[int] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("info",)
    class InfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _containers.ScalarMap[str, str]
    def __init__(self, info: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("client_id", "run", "run_status", "wait")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    RUN_STATUS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    run: RunSpec
    run_status: RunStatus
    wait: WaitTask
    def __init__(self, client_id: _Optional[str] = ..., run: _Optional[_Union[RunSpec, _Mapping]] = ..., run_status: _Optional[_Union[RunStatus, str]] = ..., wait: _Optional[_Union[WaitTask, _Mapping]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("run_id", "max_wait")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    max_wait: _duration_pb2.Duration
    def __init__(self, run_id: _Optional[str] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WaitTask(_message.Message):
    __slots__ = ("retry_after", "reason")
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    retry_after: _duration_pb2.Duration
    reason: str
    def __init__(self, retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class TrainingHyperparameters(_message.Message):
    __slots__ = ("local_steps", "epochs", "batch_size", "learning_rate", "optimizer", "weight_decay", "max_length", "seed", "gradient_accumulation_steps", "lr_scheduler", "warmup_ratio", "max_grad_norm", "gradient_checkpointing", "mixed_precision")
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    MIXED_PRECISION_FIELD_NUMBER: _ClassVar[int]
    local_steps: int
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    weight_decay: float
    max_length: int
    seed: int
    gradient_accumulation_steps: int
    lr_scheduler: str
    warmup_ratio: float
    max_grad_norm: float
    gradient_checkpointing: bool
    mixed_precision: str
    def __init__(self, local_steps: _Optional[int] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., optimizer: _Optional[str] = ..., weight_decay: _Optional[float] = ..., max_length: _Optional[int] = ..., seed: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., lr_scheduler: _Optional[str] = ..., warmup_ratio: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., gradient_checkpointing: _Optional[bool] = ..., mixed_precision: _Optional[str] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("round", "size_bytes", "sha256")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    round: int
    size_bytes: int
    sha256: str
    def __init__(self, round: _Optional[int] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class TrainTask(_message.Message):
    __slots__ = ("round", "trained_factors", "hyperparameters", "deadline", "time_left", "global_adapter")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FACTORS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    TIME_LEFT_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    round: int
    trained_factors: _containers.RepeatedScalarFieldContainer[Factor]
    hyperparameters: TrainingHyperparameters
    deadline: _timestamp_pb2.Timestamp
    time_left: _duration_pb2.Duration
    global_adapter: AdapterRef
    def __init__(self, round: _Optional[int] = ..., trained_factors: _Optional[_Iterable[_Union[Factor, str]]] = ..., hyperparameters: _Optional[_Union[TrainingHyperparameters, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., time_left: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., global_adapter: _Optional[_Union[AdapterRef, _Mapping]] = ...) -> None: ...

class DoneTask(_message.Message):
    __slots__ = ("rounds_completed", "final_adapter", "reason", "server_continues")
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FINAL_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SERVER_CONTINUES_FIELD_NUMBER: _ClassVar[int]
    rounds_completed: int
    final_adapter: AdapterRef
    reason: str
    server_continues: bool
    def __init__(self, rounds_completed: _Optional[int] = ..., final_adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., reason: _Optional[str] = ..., server_continues: _Optional[bool] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("wait", "train", "done")
    WAIT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    wait: WaitTask
    train: TrainTask
    done: DoneTask
    def __init__(self, wait: _Optional[_Union[WaitTask, _Mapping]] = ..., train: _Optional[_Union[TrainTask, _Mapping]] = ..., done: _Optional[_Union[DoneTask, _Mapping]] = ...) -> None: ...

class DownloadAdapterRequest(_message.Message):
    __slots__ = ("run_id", "round", "offset")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    offset: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class TransferHeader(_message.Message):
    __slots__ = ("total_size", "sha256", "chunk_bytes")
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    total_size: int
    sha256: str
    chunk_bytes: int
    def __init__(self, total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class DownloadAdapterResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TransferHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[TransferHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("run_id", "round", "sample_count", "metrics", "total_size", "sha256", "idempotency_key", "factors")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    sample_count: int
    metrics: _containers.ScalarMap[str, float]
    total_size: int
    sha256: str
    idempotency_key: str
    factors: _containers.RepeatedScalarFieldContainer[Factor]
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., sample_count: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., factors: _Optional[_Iterable[_Union[Factor, str]]] = ...) -> None: ...

class UploadUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadUpdateResponse(_message.Message):
    __slots__ = ("status", "bytes_received", "upload_id")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    status: UploadStatus
    bytes_received: int
    upload_id: str
    def __init__(self, status: _Optional[_Union[UploadStatus, str]] = ..., bytes_received: _Optional[int] = ..., upload_id: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("run_id", "round", "phase", "progress")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    phase: ClientPhase
    progress: float
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., phase: _Optional[_Union[ClientPhase, str]] = ..., progress: _Optional[float] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("run_status", "current_round", "round_open", "heartbeat_interval")
    RUN_STATUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_OPEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    run_status: RunStatus
    current_round: int
    round_open: bool
    heartbeat_interval: _duration_pb2.Duration
    def __init__(self, run_status: _Optional[_Union[RunStatus, str]] = ..., current_round: _Optional[int] = ..., round_open: _Optional[bool] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class QueryUploadRequest(_message.Message):
    __slots__ = ("run_id", "round", "idempotency_key", "total_size", "sha256")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    idempotency_key: str
    total_size: int
    sha256: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class QueryUploadResponse(_message.Message):
    __slots__ = ("bytes_received", "status", "upload_id")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    status: UploadStatus
    upload_id: str
    def __init__(self, bytes_received: _Optional[int] = ..., status: _Optional[_Union[UploadStatus, str]] = ..., upload_id: _Optional[str] = ...) -> None: ...

class DeclineRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeclineRunResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
