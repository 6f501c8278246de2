"""Where the virtual clients train: in this process (one shared model) or as Ray tasks.

Both run the client daemon's own code: :func:`fedrot_client.lora.load_adapter` of the round's
global adapter (every key, so nothing of the previous client survives), then
:func:`fedrot_client.training.train_locally` (or, on instruction data,
:func:`fedrot_client.instruction_training.train_instructions`). Training is seeded per round and client, so the two
backends give the same uploads for the same seeds.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fedrot.adapters import Factor
from fedrot_client.data import TextDataset
from fedrot_client.instruction_training import train_instructions
from fedrot_client.instructions import InstructionData
from fedrot_client.lora import load_adapter
from fedrot_client.training import TrainConfig, TrainResult, train_locally

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientJob:
    """One client's local training of one round."""

    client_id: str
    dataset: TextDataset | InstructionData
    config: TrainConfig


class TrainingBackend(ABC):
    """Runs a round's client jobs from the broadcast adapter; returns results in job order."""

    @abstractmethod
    def train_round(
        self,
        global_tensors: Mapping[str, Tensor],
        trained: frozenset[Factor],
        jobs: Sequence[ClientJob],
    ) -> list[TrainResult]: ...

    def close(self) -> None:
        """Release what the backend holds (Ray: its object references)."""


def train_client(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    global_tensors: Mapping[str, Tensor],
    trained: frozenset[Factor],
    job: ClientJob,
) -> TrainResult:
    """What a client daemon does in a round: load the global adapter, train locally (TRL's
    ``SFTTrainer`` on instruction data, as the daemon's instruction trainer does)."""
    load_adapter(model, global_tensors)
    if isinstance(job.dataset, InstructionData):
        return train_instructions(model, tokenizer, job.dataset, trained, job.config)
    return train_locally(model, tokenizer, job.dataset, trained, job.config)


class InProcessBackend(TrainingBackend):
    """Clients one after another on one model: each loads the global adapter first."""

    def __init__(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def train_round(
        self,
        global_tensors: Mapping[str, Tensor],
        trained: frozenset[Factor],
        jobs: Sequence[ClientJob],
    ) -> list[TrainResult]:
        return [
            train_client(self.model, self.tokenizer, global_tensors, trained, job) for job in jobs
        ]


def _ray_train_client(
    shared: tuple[PeftModel, PreTrainedTokenizerBase],
    global_tensors: Mapping[str, Tensor],
    trained: frozenset[Factor],
    job: ClientJob,
) -> tuple[dict[str, Tensor], int, float, int]:
    """A Ray task's body: the base model comes from the object store (a private copy).

    Returns plain values (``TrainResult`` holds a read-only mapping, which does not pickle):
    the uploaded tensors, samples, mean loss and steps.
    """
    model, tokenizer = shared
    result = train_client(model, tokenizer, global_tensors, trained, job)
    tensors = {key: tensor.clone() for key, tensor in result.tensors.items()}
    return tensors, result.num_samples, result.mean_loss, result.steps


class RayBackend(TrainingBackend):
    """Each client's local training is a Ray task (``num_cpus`` each). The model with its LoRA
    layers is put in the object store once; every task deserialises its own copy, so tasks
    never share mutable weights. Connects to a running Ray (``ray.init`` before) or starts a
    local one with ``init_options``."""

    def __init__(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        num_cpus: float = 1.0,
        init_options: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            import ray
        except ImportError as exc:  # the optional extra
            raise RuntimeError(
                "the ray backend needs Ray: pip install -e '.[ray]'"
            ) from exc
        self._ray = ray
        if not ray.is_initialized():
            ray.init(**dict(init_options or {"include_dashboard": False}))
        self._shared = ray.put((model, tokenizer))
        self._task = ray.remote(num_cpus=num_cpus)(_ray_train_client)
        logger.info("ray backend: model in the object store, %s CPU(s) a task", num_cpus)

    def train_round(
        self,
        global_tensors: Mapping[str, Tensor],
        trained: frozenset[Factor],
        jobs: Sequence[ClientJob],
    ) -> list[TrainResult]:
        broadcast = self._ray.put(dict(global_tensors))
        futures = [self._task.remote(self._shared, broadcast, trained, job) for job in jobs]
        return [
            TrainResult(tensors=tensors, trained=trained, num_samples=samples,
                        mean_loss=loss, steps=steps)  # fmt: skip
            for tensors, samples, loss, steps in self._ray.get(futures)
        ]

    def close(self) -> None:
        self._shared = None
