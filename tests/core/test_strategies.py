"""Schedules, registry and configuration of the aggregation strategies."""

from __future__ import annotations

import pytest
from adapter_factories import random_adapter

from fedrot.adapters import BOTH_FACTORS, Factor
from fedrot.factor_aggregation import FactorAggregator
from fedrot.product_aggregation import ProductAggregator
from fedrot.strategies import (
    RoundPlan,
    Strategy,
    StrategyConfig,
    StrategyName,
    build_strategy,
    strategy_names,
)

A, B = Factor.A, Factor.B
ONLY_A, ONLY_B = frozenset({A}), frozenset({B})
ROUNDS = range(6)


def plans(name: str, config: StrategyConfig | None = None) -> list[tuple[frozenset, Factor | None]]:
    strategy = build_strategy(name, config or StrategyConfig())
    out = []
    for t in ROUNDS:
        plan = strategy.plan(t)
        assert plan.round_index == t
        out.append((plan.trained, plan.aligned))
    return out


ALTERNATING = [(BOTH_FACTORS, None), (BOTH_FACTORS, A), (BOTH_FACTORS, B)] + [
    (BOTH_FACTORS, A),
    (BOTH_FACTORS, B),
    (BOTH_FACTORS, A),
]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fedit", [(BOTH_FACTORS, None)] * 6),
        ("fedrot", ALTERNATING),
        ("random-rotation", ALTERNATING),
        ("scalar-rescaling", ALTERNATING),
        ("ffa", [(ONLY_B, None)] * 6),
        ("rolora", [(ONLY_B, None), (ONLY_A, None)] * 3),
        ("flexlora", [(BOTH_FACTORS, None)] * 6),
        ("fedex", [(BOTH_FACTORS, None)] * 6),
    ],
)
def test_schedules(name: str, expected: list) -> None:  # type: ignore[type-arg]
    assert plans(name) == expected


@pytest.mark.parametrize("name", ["fedrot", "random-rotation", "scalar-rescaling"])
def test_opposite_parity_aligns_B_first(name: str) -> None:
    aligned = [a for _, a in plans(name, StrategyConfig(align_first=B))]
    assert aligned == [None, B, A, B, A, B]
    assert plans(name, StrategyConfig(align_first="B")) == plans(
        name, StrategyConfig(align_first=B)
    )  # type: ignore[arg-type]


def test_every_name_is_registered_and_builds_itself() -> None:
    assert strategy_names() == tuple(StrategyName)
    for name in StrategyName:
        for key in (name, str(name)):
            strategy = build_strategy(key, StrategyConfig(lam=0.7))
            assert isinstance(strategy, Strategy)
            assert strategy.name is name
            assert strategy.config.lam == 0.7


def test_unknown_strategy_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedavg'") as info:
        build_strategy("fedavg")
    for name in StrategyName:
        assert str(name) in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lam": -0.1}, "lambda"),
        ({"lam": 1.5}, "lambda"),
        ({"lam": float("nan")}, "lambda"),
        ({"align_first": "C"}, "align_first"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_config_is_validated(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        StrategyConfig(**kwargs)


def test_round_plans_are_validated() -> None:
    with pytest.raises(ValueError, match="round_index"):
        RoundPlan(-1, BOTH_FACTORS)
    with pytest.raises(ValueError, match="at least one factor"):
        RoundPlan(0, frozenset())
    with pytest.raises(ValueError, match="rotates both factors"):
        RoundPlan(1, ONLY_B, A)
    assert RoundPlan(1, frozenset({"A", "B"}), "B") == RoundPlan(1, BOTH_FACTORS, B)  # type: ignore[arg-type]


def test_start_round_picks_the_aggregator_and_reports_lambda() -> None:
    import torch

    reference = random_adapter(torch.Generator().manual_seed(0))
    kinds = {
        "fedit": FactorAggregator,
        "fedrot": FactorAggregator,
        "ffa": FactorAggregator,
        "rolora": FactorAggregator,
        "random-rotation": FactorAggregator,
        "scalar-rescaling": FactorAggregator,
        "flexlora": ProductAggregator,
        "fedex": ProductAggregator,
    }
    for name, kind in kinds.items():
        strategy = build_strategy(name, StrategyConfig(lam=0.25))
        aggregator = strategy.start_round(reference, strategy.plan(1))
        assert isinstance(aggregator, kind)
        aggregator.add("c", reference, 2.0)
        report = aggregator.finalize().report
        assert report.strategy == name and report.round_index == 1
        assert report.lam == (0.25 if name == "fedrot" else None)


@pytest.mark.parametrize("name", ["fedit", "ffa", "rolora", "flexlora", "fedex"])
def test_strategies_without_alignment_refuse_an_aligning_plan(name: str) -> None:
    strategy = build_strategy(name)
    with pytest.raises(ValueError, match="align"):
        strategy.start_round(None, RoundPlan(1, BOTH_FACTORS, A))


@pytest.mark.parametrize("name", ["flexlora", "fedex"])
def test_product_strategies_need_both_factors(name: str) -> None:
    with pytest.raises(ValueError, match="trains both factors"):
        build_strategy(name).start_round(None, RoundPlan(1, ONLY_B))


def test_fedrot_accepts_a_custom_plan() -> None:
    """The CLI picks the aligned factor itself (no schedule): any valid plan is honoured."""
    import torch

    gen = torch.Generator().manual_seed(1)
    reference, update = random_adapter(gen), random_adapter(gen)
    aggregator = build_strategy("fedrot").start_round(reference, RoundPlan(7, BOTH_FACTORS, B))
    aggregator.add("c", update, 1.0)
    report = aggregator.finalize().report
    assert report.aligned is B and report.round_index == 7
    assert len(report.clients[0].rotations) == len(update.lora)
