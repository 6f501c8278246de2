"""Aggregation strategies: which factors clients train each round and how the server merges them.

Every strategy is a class registered under a :class:`StrategyName`; :func:`build_strategy` looks
it up. A strategy answers two questions: ``plan(t)`` (which factors are trained and uploaded in
round ``t``, and which one the server aligns) and ``start_round(reference, plan)`` (a fresh
streaming :class:`~fedrot.aggregation.RoundAggregator` for that round).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, TypeVar

import torch

from fedrot.adapters import BOTH_FACTORS, Adapter, Factor
from fedrot.aggregation import RoundAggregator, RoundSetup
from fedrot.factor_aggregation import FactorAggregator
from fedrot.gauges import GaugeSolver, HaarGauge, ProcrustesGauge, ScalarGauge
from fedrot.product_aggregation import ProductAggregator, ProductRule


class StrategyName(StrEnum):
    """The registry's keys, as written on the command line and in settings."""

    FEDIT = "fedit"
    FEDROT = "fedrot"
    FFA = "ffa"
    ROLORA = "rolora"
    FLEXLORA = "flexlora"
    FEDEX = "fedex"
    RANDOM_ROTATION = "random-rotation"
    SCALAR_RESCALING = "scalar-rescaling"


@dataclass(frozen=True)
class StrategyConfig:
    """``lam``: FedRot strength in [0, 1] (0 = FedIT, 1 = hard alignment); ``align_first``: the
    factor aligned in odd rounds (even rounds t >= 2 align the other); ``seed``: the
    random-rotation ablation's seed."""

    lam: float = 0.4
    align_first: Factor = Factor.A
    seed: int = 0

    def __post_init__(self) -> None:
        lam = float(self.lam)
        if not math.isfinite(lam) or not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must lie in [0, 1], got {self.lam!r}")
        object.__setattr__(self, "lam", lam)
        try:
            object.__setattr__(self, "align_first", Factor(self.align_first))
        except ValueError:
            raise ValueError(f"align_first must be 'A' or 'B', got {self.align_first!r}") from None
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class RoundPlan:
    """Round ``round_index``: clients train and upload ``trained`` (the head and other extras
    are always trained); the server aligns ``aligned`` (None: plain averaging)."""

    round_index: int
    trained: frozenset[Factor]
    aligned: Factor | None = None

    def __post_init__(self) -> None:
        if self.round_index < 0:
            raise ValueError(f"round_index must be >= 0, got {self.round_index}")
        trained = frozenset(Factor(f) for f in self.trained)
        if not trained:
            raise ValueError("a round must train at least one factor")
        object.__setattr__(self, "trained", trained)
        if self.aligned is not None:
            object.__setattr__(self, "aligned", Factor(self.aligned))
            if trained != BOTH_FACTORS:
                raise ValueError(
                    f"aligning {self.aligned} rotates both factors, but only "
                    f"{sorted(trained)} are trained"
                )


def alternating_factor(round_index: int, first: Factor) -> Factor | None:
    """FedRot's schedule: None in round 0, ``first`` in odd rounds, the other in even ones."""
    if round_index == 0:
        return None
    if round_index % 2 == 1:
        return first
    return Factor.B if first is Factor.A else Factor.A


class Strategy(ABC):
    """A federated LoRA aggregation rule."""

    name: ClassVar[StrategyName]

    def __init__(self, config: StrategyConfig = StrategyConfig()) -> None:
        self.config = config

    @abstractmethod
    def plan(self, round_index: int) -> RoundPlan:
        """Which factors are trained and which one is aligned in round ``round_index``."""

    def start_round(
        self,
        reference: Adapter | None,
        plan: RoundPlan,
        *,
        device: torch.device | str | None = None,
        track_error: bool = True,
        scratch: str | Path | None = None,
    ) -> RoundAggregator:
        """A fresh aggregator for ``plan``. ``reference`` is the adapter broadcast at the start
        of the round (not modified); None makes the first update the reference and leaves the
        relative errors None. ``device`` defaults to the reference's (else the first
        update's); ``track_error=False`` keeps nothing per client and reports no errors;
        ``scratch`` is where a tracked round writes the clients' factors until ``finalize``
        (a disk folder; None: the system's temporary directory)."""
        setup = RoundSetup(
            plan=plan,
            strategy=str(self.name),
            lam=self._reported_lambda(),
            device=device,
            track_error=track_error,
            scratch=scratch,
        )
        return self._aggregator(reference, setup)

    def _reported_lambda(self) -> float | None:
        return None

    def _aggregator(self, reference: Adapter | None, setup: RoundSetup) -> RoundAggregator:
        return FactorAggregator(reference, setup, self._gauge(setup.plan))

    def _gauge(self, plan: RoundPlan) -> GaugeSolver | None:
        if plan.aligned is not None:
            raise ValueError(
                f"{self.name} does not align factors; got a plan aligning {plan.aligned}"
            )
        return None


_REGISTRY: dict[StrategyName, type[Strategy]] = {}

S = TypeVar("S", bound=type[Strategy])


def register(cls: S) -> S:
    """Class decorator: make ``cls`` buildable under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"strategy {cls.name} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def build_strategy(name: StrategyName | str, config: StrategyConfig = StrategyConfig()) -> Strategy:
    """The registered strategy ``name`` with ``config``; ValueError names the valid ones."""
    try:
        key = StrategyName(name)
    except ValueError:
        valid = ", ".join(str(n) for n in StrategyName)
        raise ValueError(f"unknown strategy {name!r}; valid: {valid}") from None
    return _REGISTRY[key](config)


def strategy_names() -> tuple[StrategyName, ...]:
    """Every registered name, in declaration order."""
    return tuple(n for n in StrategyName if n in _REGISTRY)


@register
class FedIT(Strategy):
    """FedIT: train A, B and head every round; average each factor; never align."""

    name = StrategyName.FEDIT

    def plan(self, round_index: int) -> RoundPlan:
        return RoundPlan(round_index, BOTH_FACTORS)


class _AlternatingGaugeStrategy(Strategy):
    """Train both factors; round 0 is plain averaging; odd rounds align ``align_first``, even
    rounds t >= 2 the other factor, against the round's reference, before averaging."""

    def plan(self, round_index: int) -> RoundPlan:
        aligned = alternating_factor(round_index, self.config.align_first)
        return RoundPlan(round_index, BOTH_FACTORS, aligned)

    def _gauge(self, plan: RoundPlan) -> GaugeSolver | None:
        if plan.aligned is None:
            return None
        return self.make_gauge(plan.round_index)

    @abstractmethod
    def make_gauge(self, round_index: int) -> GaugeSolver:
        """The gauge solver of an aligned round."""


@register
class FedRot(_AlternatingGaugeStrategy):
    """FedRot-LoRA: the alternating schedule; each client's aligned factor is rotated onto the
    reference by ``R = polar((1 - lam) I + lam R*)``, ``R*`` the det +1 Procrustes solution of
    ``A_i A_ref^T`` (or ``B_i^T B_ref``); ``A <- R^T A``, ``B <- B R``. ``lam = 0`` is FedIT."""

    name = StrategyName.FEDROT

    def make_gauge(self, round_index: int) -> GaugeSolver:
        return ProcrustesGauge(self.config.lam)

    def _reported_lambda(self) -> float | None:
        return self.config.lam


@register
class RandomRotation(_AlternatingGaugeStrategy):
    """Ablation: FedRot's schedule, but each client and module is rotated by an independent
    Haar SO(r) rotation seeded from ``(config.seed, round, client_id, module)``."""

    name = StrategyName.RANDOM_ROTATION

    def make_gauge(self, round_index: int) -> GaugeSolver:
        return HaarGauge(self.config.seed, round_index)


@register
class ScalarRescaling(_AlternatingGaugeStrategy):
    """Ablation: FedRot's schedule with a scalar gauge instead of a rotation:
    ``c = ||X_i||_F / ||X_ref||_F`` for the aligned factor ``X``, ``X_i <- X_i / c`` and the
    other factor ``<- c * other`` (``c = 1`` when either norm is 0)."""

    name = StrategyName.SCALAR_RESCALING

    def make_gauge(self, round_index: int) -> GaugeSolver:
        return ScalarGauge()


@register
class FFA(Strategy):
    """FFA-LoRA: A stays frozen at its shared initialisation (the reference's A); clients train
    and upload only B (and the head), which is averaged. Exact, half the uplink."""

    name = StrategyName.FFA

    def plan(self, round_index: int) -> RoundPlan:
        return RoundPlan(round_index, frozenset({Factor.B}))


@register
class RoLoRA(Strategy):
    """RoLoRA: even rounds train and average only B (A frozen at the global value), odd rounds
    only A; round 0 trains B because B starts at zero. The head is trained every round."""

    name = StrategyName.ROLORA

    def plan(self, round_index: int) -> RoundPlan:
        trained = Factor.B if round_index % 2 == 0 else Factor.A
        return RoundPlan(round_index, frozenset({trained}))


@register
class FlexLoRA(Strategy):
    """FlexLoRA: train both factors; the server forms ``sum p_i B_i A_i`` per module and
    redistributes its truncated SVD ``B = U_r S_r^(1/2)``, ``A = S_r^(1/2) V_r^T``."""

    name = StrategyName.FLEXLORA

    def plan(self, round_index: int) -> RoundPlan:
        return RoundPlan(round_index, BOTH_FACTORS)

    def _aggregator(self, reference: Adapter | None, setup: RoundSetup) -> RoundAggregator:
        return ProductAggregator(reference, setup, ProductRule.TRUNCATED_SVD)


@register
class FedEx(Strategy):
    """FedEx-LoRA: train both factors; average each, and return the residual
    ``sum p_i B_i A_i - B_bar A_bar`` per module for the server to fold into the base weight
    (after scaling by ``alpha / r``)."""

    name = StrategyName.FEDEX

    def plan(self, round_index: int) -> RoundPlan:
        return RoundPlan(round_index, BOTH_FACTORS)

    def _aggregator(self, reference: Adapter | None, setup: RoundSetup) -> RoundAggregator:
        return ProductAggregator(reference, setup, ProductRule.RESIDUAL)
