"""One run's settings: what a run submitted to a standing server may set.

:class:`RunSettings` and its sections (``model``, ``lora``, ``strategy``, ``training``,
``evaluation``) hold what one federated run is. A single-run server takes them flat among its
own (:class:`~fedrot_server.settings.ServerSettings` inherits :class:`RunSettings`); a standing
server validates each submitted run with :func:`validate_run_settings`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer
from pydantic import ValidationError
from pydantic import field_validator, model_validator
from pydantic_settings import NoDecode

from fedrot.strategies import StrategyName
from fedrot_server.errors import RunSettingsError

logger = logging.getLogger(__name__)
CLIENT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Portion:
    """A number of clients: a ``count``, or a ``fraction`` in (0, 1] of a population.

    Written as a whole number (``"3"``: a count), a decimal (``"0.5"``: a fraction) or
    ``"all"`` (fraction 1).
    """

    count: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.fraction is None):
            raise ValueError("give a count or a fraction")
        if self.count is not None and self.count < 1:
            raise ValueError(f"a count must be >= 1, got {self.count}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"a fraction must be in (0, 1], got {self.fraction}")

    def of(self, population: int) -> int:
        """How many of ``population`` this is: at least 1, at most ``population``."""
        if population <= 0:
            return 0
        wanted = self.count if self.count is not None else math.ceil(self.fraction * population)
        return max(1, min(population, wanted))

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        return "all" if self.fraction == 1.0 else str(self.fraction)


def parse_portion(value: object) -> Portion:
    """``3`` or ``"3"`` -> count 3; ``0.5`` or ``"0.5"`` -> fraction; ``"all"`` -> fraction 1."""
    if isinstance(value, Portion):
        return value
    if isinstance(value, bool):
        raise ValueError(f"not a count or fraction: {value!r}")
    if isinstance(value, int):
        return Portion(count=value)
    if isinstance(value, float):
        return Portion(fraction=value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return Portion(fraction=1.0)
        try:
            return Portion(fraction=float(text)) if "." in text else Portion(count=int(text))
        except ValueError:
            pass
    raise ValueError(f"not a count, a fraction or 'all': {value!r}")


PortionField = Annotated[Portion, NoDecode, BeforeValidator(parse_portion), PlainSerializer(str)]


def check_label_names(labels: Sequence[str], task: str, num_labels: int) -> None:
    """The run's class names: classification only, ``num_labels`` of them, distinct, non-empty."""
    if not labels:
        return
    if task != "classification":
        raise ValueError(f"labels name classes, but task is {task}")
    if len(labels) != num_labels:
        raise ValueError(f"labels has {len(labels)} names but num_labels is {num_labels}")
    repeated = sorted({name for name in labels if labels.count(name) > 1})
    if repeated:
        raise ValueError(f"labels must be distinct, repeated: {repeated}")
    if not all(name.strip() for name in labels):
        raise ValueError("labels must be non-empty names")


class ModelSettings(BaseModel):
    """The base model every client loads (see ``fedrot_client.models.ModelSpec``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("tiny-bert", min_length=1)
    task: Literal["classification", "causal-lm"] = "classification"
    # Classification: the run's class names in id order (label id i is labels[i]); they go to
    # every client, the held-out evaluation and the published adapters' id2label. num_labels
    # follows from them when not given. Empty: the ids 0 .. num_labels - 1, unnamed.
    labels: list[str] = Field(default_factory=list)
    num_labels: int = Field(2, ge=1)
    seed: int = Field(0, ge=0)
    # "sha256:<hex>"; empty: taken from the loaded base model (or not checked).
    fingerprint: str = ""

    @model_validator(mode="before")
    @classmethod
    def _num_labels_from_labels(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("labels"), list | tuple):
            if data["labels"] and data.get("num_labels") is None:
                return {**data, "num_labels": len(data["labels"])}
        return data

    @model_validator(mode="after")
    def _labels_for_classification(self) -> ModelSettings:
        if self.task == "classification" and self.num_labels < 2:
            raise ValueError(f"classification needs num_labels >= 2, got {self.num_labels}")
        check_label_names(self.labels, self.task, self.num_labels)
        return self


class LoraSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(4, ge=1, le=1024)
    alpha: float = Field(8.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    # Empty: the model's task head for classification, nothing for causal LM.
    modules_to_save: list[str] = Field(default_factory=list)


class StrategySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: StrategyName = StrategyName("fedrot")
    # lambda: soft-alignment strength, 0 = FedIT, 1 = hard alignment.
    alignment_strength: float = Field(0.4, ge=0, le=1)
    odd_round_factor: Literal["A", "B"] = "A"


class TrainingSettings(BaseModel):
    """Local training hyperparameters sent to clients with each task."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    local_steps: int = Field(20, ge=0)
    epochs: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(0.02, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(64, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    # Within a round: constant, or cosine from the round's rate down to 0 at its last step.
    lr_scheduler: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    # Across rounds (FlowerTune's schedule): round t trains at learning_rate (constant) or at
    # min + (learning_rate - min) * (1 + cos(pi * t / (rounds - 1))) / 2 (cosine).
    round_lr_schedule: Literal["constant", "cosine"] = "constant"
    min_learning_rate: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(0.0, ge=0, description="0: no clipping")
    gradient_checkpointing: bool = False
    # bf16/fp16 need CUDA on the client: a CPU client refuses the run in one line.
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingSettings:
        if (self.local_steps == 0) == (self.epochs == 0):
            raise ValueError(
                f"give exactly one of local_steps ({self.local_steps}) and epochs ({self.epochs})"
            )
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(f"min_learning_rate {self.min_learning_rate} is above "
                             f"learning_rate {self.learning_rate}")  # fmt: skip
        if self.round_lr_schedule == "cosine" and self.min_learning_rate <= 0:
            raise ValueError("round_lr_schedule cosine needs min_learning_rate > 0 (the last "
                             "round trains at it)")  # fmt: skip
        return self

    def learning_rate_of_round(self, round_index: int, rounds: int) -> float:
        """The peak learning rate of round ``round_index`` of ``rounds`` under
        ``round_lr_schedule`` (cosine: learning_rate at round 0, min_learning_rate at the last)."""
        if self.round_lr_schedule == "constant" or rounds < 2:
            return self.learning_rate
        progress = min(max(round_index / (rounds - 1), 0.0), 1.0)
        span = self.learning_rate - self.min_learning_rate
        return self.min_learning_rate + span * (1 + math.cos(math.pi * progress)) / 2

    def for_round(self, round_index: int, rounds: int) -> TrainingSettings:
        """These settings with the round's learning rate (what the round's task carries)."""
        rate = self.learning_rate_of_round(round_index, rounds)
        return self.model_copy(update={"learning_rate": rate})


class EvaluationSettings(BaseModel):
    """Optional server-side evaluation of each round's global adapter on a held-out file
    (JSONL, CSV/TSV or a saved Hugging Face dataset); off when ``data`` is not set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: Path | None = None
    split: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    # Deprecated alias of model.labels (the run's class names), which it fills when unset.
    labels: list[str] = Field(default_factory=list)
    batch_size: int = Field(64, ge=1)
    # Causal LM on instruction data: greedy generation of at most max_new_tokens per prompt,
    # then exact match of the answer the extractor finds ("exact", "last-number", "gsm8k",
    # "answer-is" or "regex:<pattern>").
    max_new_tokens: int = Field(32, ge=1, le=4096)
    extractor: str = "exact"
    # torch CPU threads of the evaluation worker, which scores round t's adapter while round
    # t + 1 trains; unset: half the CPUs (at least 1).
    threads: int | None = Field(None, ge=1)

    @field_validator("extractor")
    @classmethod
    def _known_extractor(cls, value: str) -> str:
        from fedrot_client.answers import extractor_named

        extractor_named(value)  # ValueError naming the valid ones
        return value


class RunSettings(BaseModel):
    """The settings of one federated run. A single-run server takes them flat among its own
    (``--rounds 5``, ``--lora.rank 8``, ``FEDROT_SERVER_ROUNDS``, the config file); a standing
    server (``--standing``) takes them per submitted run (``POST /api/v1/runs``, the same
    names). Both validate this one model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelSettings = ModelSettings()
    lora: LoraSettings = LoraSettings()
    strategy: StrategySettings = StrategySettings()
    training: TrainingSettings = TrainingSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    rounds: int = Field(5, ge=1, description="rounds the run lasts")
    clients: list[str] = Field(
        default_factory=list,
        description="the clients the run takes (names from the tokens); empty: every client",
    )
    min_clients: int = Field(2, ge=1, description="live clients needed to open a round")
    clients_per_round: PortionField = Field(
        Portion(fraction=1.0), description="participants per round: a count, a fraction or all"
    )
    quorum: PortionField = Field(
        Portion(count=1),
        description="reports that close a round at its deadline (count, or fraction of those asked)",
    )
    round_deadline_s: float = Field(600.0, gt=0, description="seconds a round waits for reports")
    seed: int = Field(0, ge=0, description="seeds sampling, LoRA init and clients' batch order")
    late_updates: Literal["drop", "stale"] = Field(
        "drop",
        description="an update for a closed round: drop (refused), or stale (aligned to the "
        "current reference and added with weight * staleness_weight ** rounds_late)",
    )
    staleness_weight: float = Field(
        0.5, gt=0, le=1, description="weight factor per round of lateness of a stale update"
    )

    @field_validator("clients")
    @classmethod
    def _check_client_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not CLIENT_NAME.fullmatch(name):
                raise ValueError(f"client name {name!r} must be 1-64 of A-Z a-z 0-9 . _ - "
                                 "(not a dot first)")  # fmt: skip
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"clients named twice: {repeated}")
        return value

    @model_validator(mode="after")
    def _check_run_consistency(self) -> RunSettings:
        per_round, quorum = self.clients_per_round.count, self.quorum.count
        if per_round is not None and quorum is not None and quorum > per_round:
            raise ValueError(f"quorum {quorum} exceeds clients_per_round {per_round}")
        if self.clients and self.min_clients > len(self.clients):
            raise ValueError(f"min_clients {self.min_clients} exceeds the {len(self.clients)} "
                             f"clients the run names")  # fmt: skip
        return self

    @model_validator(mode="before")
    @classmethod
    def _fold_evaluation_labels(cls, data: Any) -> Any:
        """``evaluation.labels`` (deprecated) names the classes when ``model.labels`` does not;
        given both, they must be equal."""
        if not isinstance(data, dict):
            return data
        alias = _given(data.get("evaluation"), "labels")
        if not alias:
            return data
        model = data.get("model")
        named = _given(model, "labels")
        if named:
            if list(named) != list(alias):
                raise ValueError("evaluation.labels (deprecated) differs from model.labels: "
                                 "give the class names once, as model.labels")  # fmt: skip
            return data
        logger.warning("evaluation.labels is deprecated: give the run's class names as "
                       "model.labels")  # fmt: skip
        if isinstance(model, ModelSettings):
            model = {name: getattr(model, name) for name in model.model_fields_set}
        return {**data, "model": {**(model if isinstance(model, dict) else {}), "labels": alias}}

    def takes(self, client: str) -> bool:
        """Whether the run takes ``client`` (it names no clients, or names this one)."""
        return not self.clients or client in self.clients


RUN_FIELDS = tuple(RunSettings.model_fields)


def _given(section: object, name: str) -> Any:
    """Field ``name`` of a settings section given as a dict or a model (None when absent)."""
    if isinstance(section, dict):
        return section.get(name)
    return getattr(section, name, None)


def validate_run_settings(data: Any) -> RunSettings:
    """A submitted run's settings (a JSON object of :class:`RunSettings` names);
    :class:`RunSettingsError` listing ``(dotted name, problem)`` for each bad one."""
    try:
        return RunSettings.model_validate(data)
    except ValidationError as exc:
        raise RunSettingsError(describe_problems(exc)) from exc


def describe_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """``(dotted name, what is wrong)`` per bad setting ("settings" when the whole is wrong)."""
    return [(".".join(str(part) for part in error["loc"]) or "settings", error["msg"])
            for error in exc.errors()]  # fmt: skip
