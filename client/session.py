"""The local side of a run: the checked base model with LoRA attached, and the client's data.

:func:`start_session` turns the run's specification (from enrolment) into a :class:`Session`:
it loads the base model named by the run (or the client's local copy), refuses one whose
fingerprint or adapter shapes differ from the run's, attaches LoRA with the run's configuration,
moves the model to the device, and loads the client's data with the run's label count.
"""

from __future__ import annotations

import logging
import platform
import socket
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedrot.adapters import AdapterSchema
from fedrot.codec import validate_tensors
from fedrot.errors import SchemaError
from fedrot_client.data import TextDataset, load_dataset
from fedrot_client.errors import ModelError
from fedrot_client.lora import LoraSpec, attach_lora, export_adapter
from fedrot_client.messages import lora_spec_of, model_spec_of, schema_of
from fedrot_client.models import ModelSpec, TaskKind, check_fingerprint, load_base_model
from fedrot_client.settings import ClientSettings
from fedrot_proto.v1 import federation_pb2 as pb

logger = logging.getLogger(__name__)

SOFTWARE = "fedrot-client 0.1.0"


@dataclass(frozen=True)
class Session:
    """Everything a run needs locally: its spec, our id, the LoRA model and our data."""

    run: pb.RunSpec
    client_id: str
    model_spec: ModelSpec
    lora: LoraSpec
    saved_modules: tuple[str, ...]
    schema: AdapterSchema
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    dataset: TextDataset

    @property
    def run_id(self) -> str:
        return self.run.run_id


    def fits(self, run: pb.RunSpec) -> bool:
        """Whether ``run`` asks for the same model, LoRA and adapter shapes (a new run of the
        same configuration, after a server restart, can keep this session's model)."""
        return (run.model, run.lora, run.schema) == (self.run.model, self.run.lora,
                                                     self.run.schema)  # fmt: skip


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without CUDA is refused."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda requested, but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def start_session(settings: ClientSettings, enrolment: pb.EnrollResponse) -> Session:
    """Load and check the base model, attach LoRA, load the data; refuse a mismatch.

    Raises :class:`ModelError` when the local base model's fingerprint or adapter shapes differ
    from the run's, and :class:`~fedrot_client.errors.DataError` for unusable data.
    """
    run = enrolment.run
    model_spec = model_spec_of(run.model, settings.model)
    base = load_base_model(model_spec)
    if run.model.fingerprint:
        check_fingerprint(base, run.model.fingerprint)
    else:
        logger.warning("the run names no base-model fingerprint; not checking %s", base.spec.name)
    lora = lora_spec_of(run.lora)
    saved = lora.modules_to_save or base.head_modules
    schema = schema_of(run.schema)
    model = attach_lora(base, lora, seed=run.strategy.seed)
    try:
        validate_tensors(export_adapter(model), schema)
    except SchemaError as exc:
        raise ModelError(f"base model {model_spec.name!r} does not fit the run's adapter: {exc}")
    model.to(resolve_device(settings.device))
    classification = model_spec.task is TaskKind.CLASSIFICATION
    dataset = load_dataset(
        settings.data,
        vocabulary=settings.label_vocabulary(model_spec.num_labels) if classification else None,
        fields=settings.field_names(classification),
        split=settings.data_split,
    )
    return Session(run, enrolment.client_id, model_spec, lora, tuple(saved), schema, model,
                   base.tokenizer, dataset)  # fmt: skip


def describe_host(settings: ClientSettings) -> dict[str, str]:
    """What the client tells the server about itself at enrolment (logged, stored)."""
    return {
        "hostname": socket.gethostname(),
        "software": SOFTWARE,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": settings.device,
        "data": settings.data.name,
    }

