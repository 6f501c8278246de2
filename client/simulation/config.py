"""What one simulated federation runs: model, data split, strategy, local training, rounds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from fedrot.adapters import Factor
from fedrot.strategies import StrategyConfig, StrategyName
from fedrot_client.answers import extractor_named
from fedrot_client.lora import LoraSpec
from fedrot_client.models import ModelSpec, TaskKind
from fedrot_client.simulation.client_basis import ClientBasis
from fedrot_client.simulation.client_starts import ClientInit
from fedrot_client.training import OptimizerName, TrainConfig


class BackendName(StrEnum):
    """Where the clients' local training runs: this process, or Ray tasks."""

    IN_PROCESS = "in-process"
    RAY = "ray"


UNSUPPORTED_STRATEGIES = frozenset({StrategyName.FEDEX})
"""FedEx-LoRA folds a dense residual into every client's base weights; the simulator keeps one
shared frozen base model, so it does not run it."""


@dataclass(frozen=True)
class SimulationConfig:
    """One federation: ``num_clients`` virtual clients over one base model.

    Each round a seeded ``client_fraction`` of the clients (at least one) trains ``local_steps``
    batches from the broadcast global adapter; the strategy aggregates the uploads with
    ``n_i`` = samples processed; every ``eval_every``-th global adapter is evaluated.
    ``client_basis`` is the basis clients report their factors in
    (:mod:`fedrot_client.simulation.client_basis`). ``client_init`` (round 0 from the broadcast
    or from each client's own LoRA init), ``stale_fraction`` and ``staleness_weight`` (a share
    of each round's updates trained from the previous round's adapter, down-weighted) are
    described in :mod:`fedrot_client.simulation.client_starts`. ``seed`` fixes the LoRA init,
    the data split, client sampling and every client's batch order, dropout and reporting
    basis (per round and client). Instruction data is scored as the server scores it: greedy
    answers of at most ``max_new_tokens`` tokens matched by ``extractor``
    (:mod:`fedrot_client.answers`), and the answers' perplexity. ``chat_template`` (Jinja text)
    replaces the tokenizer's for chat rows, as the daemon's ``--chat-template`` does.
    """

    model: ModelSpec
    lora: LoraSpec = LoraSpec()
    strategy: StrategyName = StrategyName.FEDROT
    lam: float = 0.4
    align_first: Factor = Factor.A
    num_clients: int = 3
    client_fraction: float = 1.0
    rounds: int = 10
    local_steps: int = 5
    batch_size: int = 8
    lr: float = 0.1
    optimizer: OptimizerName = OptimizerName.SGD
    max_length: int = 32
    eval_batch_size: int = 100
    eval_every: int = 1
    max_new_tokens: int = 32
    extractor: str = "exact"
    chat_template: str | None = None
    seed: int = 0
    backend: BackendName = BackendName.IN_PROCESS
    client_basis: ClientBasis = ClientBasis.SHARED
    client_init: ClientInit = ClientInit.SHARED
    stale_fraction: float = 0.0
    staleness_weight: float = 0.5
    num_threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", StrategyName(self.strategy))
        object.__setattr__(self, "backend", BackendName(self.backend))
        object.__setattr__(self, "client_basis", ClientBasis(self.client_basis))
        object.__setattr__(self, "client_init", ClientInit(self.client_init))
        object.__setattr__(self, "optimizer", OptimizerName(self.optimizer))
        if self.strategy in UNSUPPORTED_STRATEGIES:
            raise ValueError(
                f"strategy {self.strategy} is not supported by the simulator (it changes the "
                "shared base weights); use the server for it"
            )
        for name in ("num_clients", "rounds", "local_steps", "batch_size", "max_length",
                     "eval_batch_size", "eval_every", "max_new_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"SimulationConfig.{name} must be >= 1, got {getattr(self, name)}")
        fraction = float(self.client_fraction)
        if not math.isfinite(fraction) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"client_fraction must lie in (0, 1], got {self.client_fraction!r}")
        stale = float(self.stale_fraction)
        if not math.isfinite(stale) or not 0.0 <= stale <= 1.0:
            raise ValueError(f"stale_fraction must lie in [0, 1], got {self.stale_fraction!r}")
        weight = float(self.staleness_weight)
        if not math.isfinite(weight) or not 0.0 < weight <= 1.0:
            raise ValueError(f"staleness_weight must lie in (0, 1], got {self.staleness_weight!r}")
        StrategyConfig(lam=self.lam, align_first=self.align_first, seed=self.seed)  # validates
        extractor_named(self.extractor)  # ValueError naming the known ones

    @property
    def task(self) -> TaskKind:
        return self.model.task

    def strategy_config(self) -> StrategyConfig:
        return StrategyConfig(lam=self.lam, align_first=self.align_first, seed=self.seed)

    def evaluates(self, round_index: int) -> bool:
        """Whether round ``round_index`` evaluates the global adapter (every ``eval_every``-th
        round, counted from 1, and always the last)."""
        return (round_index + 1) % self.eval_every == 0 or round_index == self.rounds - 1

    def clients_per_round(self) -> int:
        return max(1, round(self.client_fraction * self.num_clients))

    def train_config(self, round_index: int, client_index: int) -> TrainConfig:
        """Client ``client_index``'s local training in round ``round_index``: its own seed."""
        return TrainConfig(
            steps=self.local_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            max_length=self.max_length,
            seed=client_seed(self.seed, round_index, client_index),
            num_threads=self.num_threads,
            progress=False,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (enums as strings)."""
        out = asdict(self)
        for key, value in list(out.items()):
            if isinstance(value, StrEnum):
                out[key] = str(value)
        out["model"] = {k: str(v) if isinstance(v, StrEnum) else v
                        for k, v in asdict(self.model).items()}  # fmt: skip
        out["lora"] = {**asdict(self.lora)}
        return out


def client_seed(seed: int, round_index: int, client_index: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client); equal across strategies, so
    two strategies with one seed see the same batches and dropout masks at the same step."""
    return (seed * 1_000_003 + round_index * 10_007 + client_index) % (2**31 - 1)
