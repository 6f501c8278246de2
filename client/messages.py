"""Protocol messages -> the client's own types (model and LoRA specs, schema, training config).

The server describes the run in ``fedrot.v1`` messages; local training speaks
:class:`~fedrot_client.models.ModelSpec`, :class:`~fedrot_client.lora.LoraSpec`,
:class:`~fedrot.adapters.AdapterSchema` and :class:`~fedrot_client.plan.TrainingPlan`.
Each conversion checks the message and raises ``ValueError`` naming the bad field.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedrot.adapters import AdapterSchema, Factor
from fedrot_client.lora import LoraSpec
from fedrot_client.models import ModelSpec, TaskKind
from fedrot_client.plan import TrainingPlan
from fedrot_proto.v1 import federation_pb2 as pb

TASK_KINDS: dict[int, TaskKind] = {
    pb.MODEL_TASK_CLASSIFICATION: TaskKind.CLASSIFICATION,
    pb.MODEL_TASK_CAUSAL_LM: TaskKind.CAUSAL_LM,
}
FACTORS: dict[int, Factor] = {pb.FACTOR_A: Factor.A, pb.FACTOR_B: Factor.B}
FACTOR_MESSAGES: dict[Factor, int] = {factor: number for number, factor in FACTORS.items()}


def model_spec_of(message: pb.ModelSpec, local_name: str | None = None) -> ModelSpec:
    """The base model to load: the run's, or ``local_name`` (a local copy of it) when given;
    a classifier's class names are the run's ``label_names`` (its config's ``id2label``)."""
    task = TASK_KINDS.get(message.task)
    if task is None:
        raise ValueError(f"run spec model.task {message.task} is not a known ModelTask")
    classification = task is TaskKind.CLASSIFICATION
    names = tuple(message.label_names) if classification else ()
    num_labels = (message.num_labels or len(names)) if classification else 2
    if names and len(names) != num_labels:
        raise ValueError(f"run spec model.label_names names {len(names)} classes, but "
                         f"model.num_labels is {num_labels}")  # fmt: skip
    return ModelSpec(name=local_name or message.name, task=task, num_labels=num_labels,
                     seed=message.seed, label_names=names)  # fmt: skip


def lora_spec_of(message: pb.LoraConfig) -> LoraSpec:
    return LoraSpec(
        r=message.rank,
        alpha=message.alpha,
        dropout=message.dropout,
        target_modules=tuple(message.target_modules),
        modules_to_save=tuple(message.modules_to_save) or None,
    )


def schema_of(message: pb.AdapterSchema) -> AdapterSchema:
    """Module shapes ``(d_out, d_in)`` and extra shapes, as every adapter of the run has."""
    if message.rank < 1 or not message.modules:
        raise ValueError(
            f"run spec schema: rank {message.rank} with {len(message.modules)} modules"
        )
    return AdapterSchema(
        rank=message.rank,
        modules={m.name: (int(m.d_out), int(m.d_in)) for m in message.modules},
        extra={e.key: tuple(int(n) for n in e.shape) for e in message.extra},
    )


def factors_of(numbers: Iterable[int]) -> frozenset[Factor]:
    """The factors a task names; an empty or unknown value raises ``ValueError``."""
    found = set()
    for number in numbers:
        if number not in FACTORS:
            raise ValueError(f"task trained_factors holds unknown factor {number}")
        found.add(FACTORS[number])
    if not found:
        raise ValueError("task trained_factors is empty")
    return frozenset(found)


def factor_messages(factors: Iterable[Factor]) -> list[int]:
    return sorted(FACTOR_MESSAGES[Factor(f)] for f in factors)


def training_plan_of(message: pb.TrainingHyperparameters) -> TrainingPlan:
    """The round's training settings: ``local_steps`` batches, or ``epochs`` passes when 0."""
    return TrainingPlan(
        local_steps=message.local_steps or None,
        epochs=None if message.local_steps else (message.epochs or 1),
        batch_size=message.batch_size or 16,
        learning_rate=message.learning_rate,
        optimizer=message.optimizer or "sgd",
        weight_decay=message.weight_decay,
        max_length=message.max_length or 64,
        seed=message.seed,
        gradient_accumulation_steps=max(message.gradient_accumulation_steps, 1),
        lr_scheduler=message.lr_scheduler or "constant",
        warmup_ratio=message.warmup_ratio,
        max_grad_norm=message.max_grad_norm or None,
        gradient_checkpointing=message.gradient_checkpointing,
        mixed_precision=message.mixed_precision or "no",
    )
