"""The aggregation error with memory flat in N: the dense path (whole and in strips) against the
Gram path and against float64 formulas, the perfect-alignment floor, nothing held per client
but what the scratch file holds, and a scratch file that cannot be written."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from adapter_factories import random_adapter
from test_aggregation import (
    STRATEGY_ROUNDS,
    adapters,
    aggregate,
    dense_error,
    direct_fedrot,
    normalised,
    rotated_clients,
)

import fedrot.error_tracking
import fedrot.factor_spill
from fedrot.adapters import Adapter, Factor, LoraPair
from fedrot.aggregation import AggregationResult
from fedrot.alignment import sample_haar_rotation
from fedrot.error_tracking import GroupErrorTracker
from fedrot.module_groups import ModuleGroup
from fedrot.strategies import StrategyConfig, build_strategy

DENSE = {"GRAM_BUDGET": 0.0}
"""Fold from the first client: the whole round on the dense path."""

STRIPS = {"GRAM_BUDGET": 0.0, "STRIP_ROWS": 33, "BATCH_RANK": 6}
"""The dense path with :data:`WIDE_SHAPES` and rank 3 in a tiny working set: ``Q`` of a 40-row
module in strips of 33 and 7 rows (24 and 0 for the other), clients read back two at a time."""

GRAM_SLICES = {"GRAM_SLICE_BYTES": 1}
"""The Gram path reading one module at a time."""

WIDE_SHAPES = {"m.q": (40, 24), "m.v": (40, 24), "m.o": (24, 36)}
"""Modules whose dense ``d_out x d_in`` is about five rank-3 clients' factors."""


def near_reference_clients(
    n: int, seed: int, shapes: dict[str, tuple[int, int]] | None = None, rank: int = 3
) -> tuple[Adapter, list[Adapter]]:
    """A realistic round: every client moved a little from the reference (a shared direction
    plus its own) and expressed in its own random latent basis."""
    gen = torch.Generator().manual_seed(seed)
    reference = random_adapter(gen, rank=rank, shapes=shapes)
    shared = random_adapter(gen, rank=rank, shapes=shapes)
    clients = []
    for _ in range(n):
        own = random_adapter(gen, rank=rank, shapes=shapes)
        rotations = sample_haar_rotation(len(reference.lora), rank, gen)
        lora = {}
        for k, (module, ref) in enumerate(reference.lora.items()):
            step = {
                f: 0.05 * shared.lora[module].factor(f) + 0.02 * own.lora[module].factor(f)
                for f in Factor
            }
            A = rotations[k].T @ (ref.A + step[Factor.A])
            B = (ref.B + step[Factor.B]) @ rotations[k]
            lora[module] = LoraPair(A=A, B=B)
        extra = {k: v + 0.1 * own.extra[k] for k, v in reference.extra.items()}
        clients.append(Adapter(lora=lora, extra=extra))
    return reference, clients


def with_budgets(
    monkeypatch: pytest.MonkeyPatch, budgets: dict[str, float], run: object
) -> AggregationResult:
    with monkeypatch.context() as patch:
        for name, value in budgets.items():
            patch.setattr(fedrot.error_tracking, name, value)
        return run()  # type: ignore[operator,no-any-return]


def module_norms(result: AggregationResult) -> list[tuple[float, float, float]]:
    return [
        (m.aggregation_error, m.update_norm, m.factor_average_error)  # type: ignore[misc]
        for m in result.report.modules
    ]


def assert_norms_close(
    got: Sequence[tuple[float, float, float]],
    expected: Sequence[tuple[float, float, float]],
    rel: float,
    floor: float = 0.0,
) -> None:
    for mine, theirs in zip(got, expected, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert a == pytest.approx(b, rel=rel, abs=floor), (got, expected)


# --- dense path against the Gram path and float64 formulas --------------------------------------


@pytest.mark.parametrize(
    "budgets", [DENSE, STRIPS, GRAM_SLICES], ids=["dense", "strips", "gram-slices"]
)
@pytest.mark.parametrize("name, round_index", STRATEGY_ROUNDS)
@pytest.mark.parametrize("streamed", [False, True], ids=["stacked", "streamed"])
def test_dense_errors_equal_the_gram_errors(
    name: str,
    round_index: int,
    streamed: bool,
    budgets: dict[str, float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedrot.module_groups

    if streamed:
        monkeypatch.setattr(fedrot.module_groups, "STREAM_MODULE_BYTES", 0)
    reference, clients = near_reference_clients(12, seed=31, shapes=WIDE_SHAPES)
    weights = [1.0 + 0.37 * i for i in range(12)]
    kw = {"round_index": round_index, "config": StrategyConfig(lam=0.4)}
    gram = aggregate(name, reference, clients, weights, **kw)  # type: ignore[arg-type]
    dense = with_budgets(
        monkeypatch, budgets, lambda: aggregate(name, reference, clients, weights, **kw)
    )
    for key, tensor in gram.adapter.to_state_dict().items():
        assert torch.equal(dense.adapter.to_state_dict()[key], tensor), key
    assert_norms_close(module_norms(dense), module_norms(gram), rel=1e-3, floor=1e-9)
    relative = dense.report.relative_aggregation_error
    assert relative == pytest.approx(gram.report.relative_aggregation_error, rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("round_index, which", [(1, Factor.A), (2, Factor.B)])
def test_dense_errors_equal_float64_formulas(
    round_index: int, which: Factor, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, *updates = adapters(7, seed=32)
    weights = [1.0, 3.0, 2.0, 0.5, 1.5, 2.5]
    config = StrategyConfig(lam=0.4)
    result = with_budgets(
        monkeypatch,
        DENSE,
        lambda: aggregate(
            "fedrot", reference, updates, weights, round_index=round_index, config=config
        ),
    )
    p = normalised(weights)
    for module, (_, _, As, Bs) in direct_fedrot(reference, updates, weights, which, 0.4).items():
        pair, ref = result.adapter.lora[module], reference.lora[module]
        error = next(m for m in result.report.modules if m.module == module)
        mean_A = sum(pi * a for pi, a in zip(p, As, strict=True))
        mean_B = sum(pi * b for pi, b in zip(p, Bs, strict=True))
        assert error.aggregation_error == pytest.approx(
            dense_error(As, Bs, p, pair.B, pair.A), rel=1e-4
        )
        assert error.update_norm == pytest.approx(dense_error(As, Bs, p, ref.B, ref.A), rel=1e-4)
        assert error.factor_average_error == pytest.approx(
            dense_error(As, Bs, p, mean_B, mean_A), rel=1e-4  # type: ignore[arg-type]
        )


@pytest.mark.parametrize("budgets", [DENSE, STRIPS], ids=["dense", "strips"])
@pytest.mark.parametrize("name", ["flexlora", "fedex"])
def test_product_strategies_errors_equal_float64_formulas(
    name: str, budgets: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """FlexLoRA and FedEx take their norms from their own dense sum (no per-client storage,
    whatever the tracker's budgets)."""
    reference, clients = near_reference_clients(6, seed=33, shapes=WIDE_SHAPES)
    weights = [2.0, 1.0, 1.0, 3.0, 0.5, 1.25]
    result = with_budgets(
        monkeypatch, budgets, lambda: aggregate(name, reference, clients, weights)
    )
    p = normalised(weights)
    for error in result.report.modules:
        As = [c.lora[error.module].A for c in clients]
        Bs = [c.lora[error.module].B for c in clients]
        pair, ref = result.adapter.lora[error.module], reference.lora[error.module]
        mean_A = sum(pi * a.double() for pi, a in zip(p, As, strict=True))
        mean_B = sum(pi * b.double() for pi, b in zip(p, Bs, strict=True))
        average = dense_error(As, Bs, p, mean_B, mean_A)  # type: ignore[arg-type]
        assert error.factor_average_error == pytest.approx(average, rel=1e-4)
        assert error.update_norm == pytest.approx(dense_error(As, Bs, p, ref.B, ref.A), rel=1e-4)
        if name == "flexlora":  # the SVD tail: exact up to the float32 terms of the sums
            expected = dense_error(As, Bs, p, pair.B, pair.A)
            size = dense_error(As, Bs, p, torch.zeros_like(pair.B), pair.A)  # ||S||
            assert error.aggregation_error == pytest.approx(expected, rel=1e-4, abs=1e-6 * size)
        else:  # what float32 rounding leaves of S - B_g A_g - residual
            assert error.aggregation_error <= 1e-6 * average


@pytest.mark.parametrize("name, round_index", [("fedrot", 1), ("fedrot", 2), ("fedit", 1)])
def test_a_float32_dense_accumulator_matches_a_float64_one(
    name: str, round_index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Q`` holds second-order terms only, so float32 loses nothing that matters (about 2e-7
    relative measured, against 1e-5 between the Gram and the dense paths)."""
    reference, clients = near_reference_clients(12, seed=37)
    weights = [1.0 + 0.5 * (i % 4) for i in range(12)]
    kw = {"round_index": round_index, "config": StrategyConfig(lam=0.4)}
    results = {}
    for dtype in (torch.float32, torch.float64):
        budgets = {**DENSE, "DENSE_DTYPE": dtype}
        results[dtype] = with_budgets(
            monkeypatch, budgets, lambda: aggregate(name, reference, clients, weights, **kw)
        )
    got, expected = results[torch.float32], results[torch.float64]
    assert_norms_close(module_norms(got), module_norms(expected), rel=1e-5)


@pytest.mark.parametrize("round_index, which", [(1, Factor.A), (2, Factor.B)])
def test_perfect_alignment_reports_near_zero_on_the_dense_path(
    round_index: int, which: Factor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotated copies of one update: float32 round-off of the dense path stays below 1e-6 of
    the update (about 4e-8 measured; the Gram path is near 1e-13), FedIT's error is large."""
    reference, clients = rotated_clients(8, which, seed=8)
    weights = [1.0 + i for i in range(8)]
    config = StrategyConfig(lam=1.0)

    def both() -> tuple[AggregationResult, AggregationResult]:
        hard = aggregate("fedrot", reference, clients, weights, round_index=round_index,
                         config=config)  # fmt: skip
        return hard, aggregate("fedit", reference, clients, weights)

    hard, fedit = with_budgets(monkeypatch, DENSE, both)  # type: ignore[arg-type,misc]
    assert hard.report.relative_aggregation_error < 1e-6
    assert fedit.report.relative_aggregation_error > 0.3
    assert hard.report.factor_average_error < 1e-6 * fedit.report.factor_average_error


# --- memory bounded in the number of clients ----------------------------------------------------


def held_tensor_bytes(root: object) -> int:
    """Bytes of the distinct tensor storages reachable from ``root`` through attributes,
    dataclass fields, dicts, lists and tuples."""
    seen_objects: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set):
            stack.extend(obj)
        elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values() if hasattr(obj, "__dict__") else ())
            if dataclasses.is_dataclass(obj):
                stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
    return sum(storages.values())


def test_a_tracked_round_holds_nothing_per_client_in_memory(tmp_path: Path) -> None:
    """Whatever the number of clients, a tracked FedRot round holds the same tensors: each
    client's factors go to the scratch file (and only there), and the dense path reads them
    back within its working set."""
    shapes = {"m.q": (32, 24), "m.v": (32, 24)}
    reference, clients = near_reference_clients(8, seed=34, shapes=shapes, rank=2)
    strategy = build_strategy("fedrot")
    aggregator = strategy.start_round(reference, strategy.plan(1), scratch=tmp_path)
    held, spilled = [], []
    for i in range(120):
        aggregator.add(f"c{i}", clients[i % len(clients)], 1.0 + i % 3)
        held.append(held_tensor_bytes(aggregator))
        spilled.append(spilled_bytes(aggregator))
    assert max(held[1:]) == min(held[1:])
    per_client = sum(2 * (d_out + d_in) * 4 for d_out, d_in in shapes.values())
    assert spilled == [per_client * (i + 1) for i in range(120)]
    assert aggregator.finalize().report.aggregation_error > 0
    assert spilled_bytes(aggregator) == 0
    assert list(tmp_path.iterdir()) == []  # the scratch file is unlinked from the start


def spilled_bytes(aggregator: object) -> int:
    trackers = [s.errors for s in aggregator._state if s.errors is not None]  # type: ignore[attr-defined]
    return sum(t.spilled_bytes() for t in trackers)


def test_the_tracker_switches_to_the_dense_path_at_the_budget() -> None:
    group = ModuleGroup(index=0, d_out=16, d_in=16, rank=2, modules=("a", "b"))
    gen = torch.Generator().manual_seed(35)
    reference = {f: torch.randn(2, 2, 16, generator=gen) for f in Factor}
    tracker = GroupErrorTracker(group, reference)
    dense, per_client = 2 * 16 * 16 * 4, 2 * 2 * 32 * 4
    for n in range(1, 12):
        rows = {f: [torch.randn(2, 16, generator=gen) for _ in range(2)] for f in Factor}
        tracker.add(1.0, rows)
        assert tracker.uses_gram == (n < dense // per_client)
        assert tracker.spilled_bytes() == n * per_client


def test_a_scratch_file_that_cannot_be_written_leaves_the_aggregate_and_drops_the_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reference, clients = near_reference_clients(5, seed=38, shapes=WIDE_SHAPES)
    weights = [1.0, 2.0, 1.5, 0.5, 3.0]
    kw = {"round_index": 1, "config": StrategyConfig(lam=0.4)}
    expected = aggregate("fedrot", reference, clients, weights, **kw)  # type: ignore[arg-type]
    writes = {"n": 0}
    real_append = fedrot.factor_spill.FactorSpill.append

    def append_until_full(self: object, rows: object) -> None:
        writes["n"] += 1
        if writes["n"] > 4:
            raise OSError(28, "No space left on device")
        real_append(self, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(fedrot.factor_spill.FactorSpill, "append", append_until_full)
    with caplog.at_level("WARNING", logger="fedrot.error_tracking"):
        got = aggregate("fedrot", reference, clients, weights, **kw)  # type: ignore[arg-type]
    for key, tensor in expected.adapter.to_state_dict().items():
        assert torch.equal(got.adapter.to_state_dict()[key], tensor), key
    assert expected.report.aggregation_error is not None
    assert got.report.aggregation_error is None and got.report.modules == ()
    assert "No space left on device" in caplog.text


def test_frozen_factor_rounds_keep_nothing_per_client() -> None:
    reference, *updates = adapters(30, seed=36)
    strategy = build_strategy("ffa")
    aggregator = strategy.start_round(reference, strategy.plan(3))
    for i, update in enumerate(updates):
        aggregator.add(f"c{i}", update, 1.0)
        if i == 1:  # after the first update made the scratch buffers a later one uses
            second = held_tensor_bytes(aggregator)
    assert held_tensor_bytes(aggregator) == second
    assert aggregator.finalize().report.aggregation_error == 0.0

