"""The run's specification (what every client is told at enrolment) and the model seams.

``RunSpec`` comes from the settings; the round-0 adapter comes from an :data:`Initializer`
seam (tests pass tiny synthetic adapters, production loads the base model through
``fedrot_client``), and optional server-side evaluation from an :data:`Evaluator` seam.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fedrot.adapters import Adapter, AdapterSchema
from fedrot.strategies import StrategyConfig
from fedrot_server.run_settings import (
    LoraSettings,
    ModelSettings,
    RunSettings,
    StrategySettings,
    TrainingSettings,
)
from fedrot_server.settings import MAX_CHUNK_BYTES, ServerSettings


@dataclass(frozen=True)
class TransferLimits:
    """Chunk sizes (bytes) and the cap on one upload's total size."""

    chunk_bytes: int
    max_chunk_bytes: int
    max_upload_bytes: int


@dataclass(frozen=True)
class RunSpec:
    """One federated run as configured: model, LoRA, strategy, local training, rounds."""

    run_id: str
    model: ModelSettings
    lora: LoraSettings
    strategy: StrategySettings
    training: TrainingSettings
    rounds: int
    seed: int
    limits: TransferLimits
    heartbeat_interval_s: float

    @classmethod
    def from_settings(
        cls, settings: ServerSettings, run_id: str | None = None, run: RunSettings | None = None
    ) -> RunSpec:
        """The spec of ``run`` (default: the run given at start) on a server of ``settings``."""
        run = settings if run is None else run
        return cls(
            run_id=run_id or new_run_id(),
            model=run.model,
            lora=run.lora,
            strategy=run.strategy,
            training=run.training,
            rounds=run.rounds,
            seed=run.seed,
            limits=TransferLimits(
                chunk_bytes=settings.chunk_bytes,
                max_chunk_bytes=MAX_CHUNK_BYTES,
                max_upload_bytes=settings.max_upload_bytes,
            ),
            heartbeat_interval_s=settings.heartbeat_interval_s,
        )

    def strategy_config(self) -> StrategyConfig:
        return StrategyConfig(
            lam=self.strategy.alignment_strength,
            align_first=self.strategy.odd_round_factor,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, object]:
        """Plain JSON data (stored with the run)."""
        return {
            "run_id": self.run_id,
            "model": self.model.model_dump(mode="json"),
            "lora": self.lora.model_dump(mode="json"),
            "strategy": self.strategy.model_dump(mode="json"),
            "training": self.training.model_dump(mode="json"),
            "rounds": self.rounds,
            "seed": self.seed,
            "limits": vars(self.limits),
            "heartbeat_interval_s": self.heartbeat_interval_s,
        }


@dataclass(frozen=True)
class InitialModel:
    """The round-0 global adapter (float32, CPU), the base model's fingerprint
    (``"sha256:<hex>"``, or ``""`` when unknown: clients then skip the check) and a local folder
    that loads as the base model (``""``: adapters name the model setting instead)."""

    adapter: Adapter
    fingerprint: str = ""
    base_model_path: str = ""

    @property
    def schema(self) -> AdapterSchema:
        return AdapterSchema.of(self.adapter)


Initializer = Callable[[RunSpec], InitialModel]
"""Builds the round-0 adapter of a run (PEFT init: A random from the seed, B zeros, the head)."""

Evaluator = Callable[[Adapter], Mapping[str, float]]
"""Evaluates a global adapter (CPU tensors) on held-out data: ``{"accuracy": ..., ...}``."""


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"
