"""What a client knows of its run (``fed.run``) and of the rounds it worked on (``fed.rounds``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedrot.adapters import AdapterSchema
from fedrot_client.lora import LoraSpec
from fedrot_client.messages import lora_spec_of, model_spec_of, schema_of
from fedrot_client.models import ModelSpec, TaskKind
from fedrot_proto.v1 import federation_pb2 as pb


@dataclass(frozen=True)
class RunInfo:
    """The run this client joined, as the server described it at enrolment.

    ``model`` is the run's base model (``name``, ``task``, ``num_labels``, ``seed``) and
    ``fingerprint`` its ``sha256:`` digest (empty when the server did not compute one);
    ``lora`` the LoRA configuration (``rank``, ``alpha``, ``dropout``, ``target_modules``);
    ``schema`` the exact keys and shapes of every adapter of the run; ``label_names`` the
    class names of a classification run in id order (empty when the run names none: ids
    ``0 .. num_labels - 1``).
    """

    run_id: str
    client_id: str
    rounds: int
    model: ModelSpec
    fingerprint: str
    lora: LoraSpec
    strategy: str
    alignment_strength: float
    schema: AdapterSchema
    heartbeat_interval_s: float
    label_names: tuple[str, ...] = ()

    @property
    def task(self) -> TaskKind:
        """``classification`` or ``causal-lm``."""
        return self.model.task

    @classmethod
    def of(cls, enrolment: pb.EnrollResponse) -> RunInfo:
        run = enrolment.run
        return cls(
            run_id=run.run_id,
            client_id=enrolment.client_id,
            rounds=run.rounds,
            model=model_spec_of(run.model),
            fingerprint=run.model.fingerprint,
            lora=lora_spec_of(run.lora),
            strategy=run.strategy.name,
            alignment_strength=run.strategy.alignment_strength,
            schema=schema_of(run.schema),
            heartbeat_interval_s=run.heartbeat_interval.ToNanoseconds() / 1e9,
            label_names=tuple(run.model.label_names),
        )


@dataclass(frozen=True)
class RoundRecord:
    """One round this client worked on; ``status`` is ``accepted``, ``duplicate`` or
    ``dropped`` (withdrawn, closed first, or refused by the server)."""

    round_index: int
    status: str
    num_samples: int = 0
    train_loss: float | None = None
    upload_bytes: int = 0


@dataclass(frozen=True)
class Submission:
    """What :meth:`Task.submit` returns: ``status`` is ``"accepted"`` (counted in the round)
    or ``"duplicate"`` (the server had accepted this very update already, e.g. before a
    restart); ``size_bytes`` is the encoded update's size."""

    round_index: int
    status: str
    upload_id: str
    size_bytes: int
