"""Streaming aggregation against direct formulas, diagnostics against dense ones, misuse."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import pytest
import torch
from adapter_factories import SHAPES, random_adapter

from fedrot.adapters import Adapter, Factor, LoraPair
from fedrot.aggregation import AggregationResult
from fedrot.alignment import sample_haar_rotation
from fedrot.diagnostics import product_sum_norms
from fedrot.errors import AggregationStateError, SchemaError
from fedrot.strategies import RoundPlan, StrategyConfig, StrategyName, build_strategy


def adapters(n: int, seed: int, device: torch.device | str = "cpu", **kw: object) -> list[Adapter]:
    gen = torch.Generator().manual_seed(seed)
    return [random_adapter(gen, device=device, **kw) for _ in range(n)]  # type: ignore[arg-type]


def aggregate(
    name: StrategyName | str,
    reference: Adapter | None,
    updates: Sequence[Adapter],
    weights: Sequence[float],
    *,
    round_index: int = 1,
    config: StrategyConfig | None = None,
    plan: RoundPlan | None = None,
    ids: Sequence[str] | None = None,
    **kw: object,
) -> AggregationResult:
    strategy = build_strategy(name, config or StrategyConfig())
    aggregator = strategy.start_round(reference, plan or strategy.plan(round_index), **kw)  # type: ignore[arg-type]
    for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
        aggregator.add(ids[i] if ids else f"client-{i}", update, weight)
    return aggregator.finalize()


def normalised(weights: Sequence[float]) -> list[float]:
    return [w / sum(weights) for w in weights]


def rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y).clamp_min(1e-30))


def proper_polar(matrix: torch.Tensor) -> torch.Tensor:
    """Reference implementation for one matrix, float64: U V^T with det +1."""
    u, _, vh = torch.linalg.svd(matrix.double())
    if torch.linalg.det(u @ vh) < 0:
        vh = vh.clone()
        vh[-1] *= -1
    return u @ vh


def direct_fedrot(
    reference: Adapter,
    updates: Sequence[Adapter],
    weights: Sequence[float],
    which: Factor,
    lam: float,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]]:
    """Module by module, client by client, in float64: (A_g, B_g, aligned A_i, aligned B_i)."""
    p = normalised(weights)
    out = {}
    for module, ref in reference.lora.items():
        As, Bs = [], []
        for update in updates:
            A, B = update.lora[module].A.double(), update.lora[module].B.double()
            cross = A @ ref.A.double().T if which is Factor.A else B.T @ ref.B.double()
            hard = proper_polar(cross)
            eye = torch.eye(hard.shape[0], dtype=torch.float64, device=hard.device)
            rotation = proper_polar((1 - lam) * eye + lam * hard)
            As.append(rotation.T @ A)
            Bs.append(B @ rotation)
        A_g = sum(pi * a for pi, a in zip(p, As, strict=True))
        B_g = sum(pi * b for pi, b in zip(p, Bs, strict=True))
        out[module] = (A_g, B_g, As, Bs)  # type: ignore[assignment]
    return out


def dense_error(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    p: Sequence[float],
    B_x: torch.Tensor,
    A_x: torch.Tensor,
) -> float:
    target = sum(pi * b.double() @ a.double() for pi, a, b in zip(p, As, Bs, strict=True))
    return float(torch.linalg.matrix_norm(target - B_x.double() @ A_x.double()))


# --- streaming equals direct formulas ---------------------------------------------------------


def test_fedit_equals_the_weighted_average(device: torch.device) -> None:
    reference, *updates = adapters(6, seed=1, device=device)
    weights = [1.0, 2.0, 0.5, 3.0, 1.5]
    result = aggregate("fedit", reference, updates, weights)
    p = normalised(weights)
    for key, tensor in result.adapter.to_state_dict().items():
        expected = sum(pi * u.to_state_dict()[key] for pi, u in zip(p, updates, strict=True))
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6)
        assert tensor.device.type == device.type
    assert result.base_deltas == {}


@pytest.mark.parametrize("round_index, which", [(1, Factor.A), (2, Factor.B)])
@pytest.mark.parametrize("lam", [0.4, 1.0])
def test_fedrot_equals_the_direct_formula(
    round_index: int, which: Factor, lam: float, device: torch.device
) -> None:
    reference, *updates = adapters(5, seed=2, device=device)
    weights = [1.0, 3.0, 2.0, 0.5]
    result = aggregate(
        "fedrot",
        reference,
        updates,
        weights,
        round_index=round_index,
        config=StrategyConfig(lam=lam),
    )
    direct = direct_fedrot(reference, updates, weights, which, lam)
    p = normalised(weights)
    for module, (A_g, B_g, As, Bs) in direct.items():
        pair = result.adapter.lora[module]
        torch.testing.assert_close(pair.A.double(), A_g, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pair.B.double(), B_g, rtol=1e-4, atol=1e-5)
        error = next(m for m in result.report.modules if m.module == module)
        expected = dense_error(As, Bs, p, pair.B, pair.A)
        assert error.aggregation_error == pytest.approx(expected, rel=1e-4)
        update_size = dense_error(As, Bs, p, reference.lora[module].B, reference.lora[module].A)
        assert error.relative_aggregation_error == pytest.approx(expected / update_size, rel=1e-4)
    extra = sum(pi * u.extra["classifier.weight"] for pi, u in zip(p, updates, strict=True))
    torch.testing.assert_close(result.adapter.extra["classifier.weight"], extra)


def test_global_errors_are_root_sums_of_squares() -> None:
    reference, *updates = adapters(4, seed=3)
    report = aggregate("fedit", reference, updates, [1.0, 1.0, 2.0]).report
    squares = sum(m.aggregation_error**2 for m in report.modules)
    assert report.aggregation_error == pytest.approx(squares**0.5)
    denominators = sum(m.update_norm**2 for m in report.modules)
    assert report.relative_aggregation_error == pytest.approx((squares / denominators) ** 0.5)


MIXED_SHAPES = {"m.q": (6, 5), "m.v": (6, 5), "m.o": (4, 7), "m.big": (40, 24)}
"""Module shapes of which, with ``STREAM_MODULE_BYTES = 512``, ``m.big`` (768 bytes of float32
factors at rank 3) is streamed and the others are stacked."""

ORDER_CASES = [
    ("fedit", 1),
    ("fedrot", 1),
    ("fedrot", 2),
    ("ffa", 3),
    ("rolora", 0),
    ("rolora", 1),
    ("flexlora", 1),
    ("fedex", 1),
    ("random-rotation", 1),
    ("scalar-rescaling", 2),
]


@pytest.mark.parametrize("name, round_index", ORDER_CASES)
def test_arrival_order_gives_a_bit_identical_adapter(
    name: str, round_index: int, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The published adapter (and FedEx's residuals) is the same bits whatever order the same
    updates arrive in, on stacked and streamed groups, with and without error tracking."""
    import fedrot.module_groups

    monkeypatch.setattr(fedrot.module_groups, "STREAM_MODULE_BYTES", 512)
    reference, *updates = adapters(13, seed=4, device=device, shapes=MIXED_SHAPES)
    weights = [0.3 + 1.7 * i for i in range(12)]  # weights with many significant bits
    ids = [f"c{i}" for i in range(12)]
    kw = {"round_index": round_index, "ids": ids}
    first = aggregate(name, reference, updates, weights, **kw)  # type: ignore[arg-type]
    first_state = first.adapter.to_state_dict()
    order = list(range(12))
    for seed in range(4):
        random.Random(seed).shuffle(order)
        again = aggregate(
            name,
            reference,
            [updates[i] for i in order],
            [weights[i] for i in order],
            round_index=round_index,
            ids=[ids[i] for i in order],
            track_error=seed % 2 == 0,
        )
        state = again.adapter.to_state_dict()
        assert state.keys() == first_state.keys()
        for key, tensor in first_state.items():
            assert torch.equal(state[key], tensor), (seed, key)
        assert again.base_deltas.keys() == first.base_deltas.keys()
        for module, delta in first.base_deltas.items():
            assert torch.equal(again.base_deltas[module], delta), (seed, module)
        if seed % 2 == 0:
            # the error of a near-cancelling difference is less well conditioned than the result
            assert again.report.aggregation_error == pytest.approx(
                first.report.aggregation_error, rel=1e-5, abs=1e-9
            )


def test_lambda_zero_is_fedit_exactly(device: torch.device) -> None:
    reference, *updates = adapters(5, seed=5, device=device)
    weights = [1.0, 2.0, 3.0, 4.0]
    for round_index in (1, 2):
        fedit = aggregate("fedit", reference, updates, weights, round_index=round_index)
        fedrot = aggregate(
            "fedrot",
            reference,
            updates,
            weights,
            round_index=round_index,
            config=StrategyConfig(lam=0.0),
        )
        for key, tensor in fedit.adapter.to_state_dict().items():
            assert torch.equal(fedrot.adapter.to_state_dict()[key], tensor), key
        assert fedrot.report.aggregation_error == fedit.report.aggregation_error


def test_track_error_does_not_change_the_result() -> None:
    reference, *updates = adapters(4, seed=6)
    weights = [1.0, 2.0, 3.0]
    for name in ("fedrot", "fedit", "flexlora", "fedex"):
        tracked = aggregate(name, reference, updates, weights)
        untracked = aggregate(name, reference, updates, weights, track_error=False)
        for key, tensor in tracked.adapter.to_state_dict().items():
            assert torch.equal(untracked.adapter.to_state_dict()[key], tensor)
        report = untracked.report
        assert report.aggregation_error is None and report.relative_aggregation_error is None
        assert report.modules == ()


# --- identical and rotated clients ------------------------------------------------------------


def completed(update: Adapter, reference: Adapter, plan: RoundPlan) -> Adapter:
    """What the server does with a partial upload: frozen factors from the reference."""
    partial = {
        which.key(m): pair.factor(which)
        for m, pair in update.lora.items()
        for which in plan.trained
    }
    return reference.with_factors_from({**partial, **update.extra})


@pytest.mark.parametrize("name", [str(n) for n in StrategyName])
@pytest.mark.parametrize("round_index", [0, 1, 2])
def test_identical_updates_aggregate_to_themselves(name: str, round_index: int) -> None:
    reference, update = adapters(2, seed=7)
    strategy = build_strategy(name)
    plan = strategy.plan(round_index)
    update = completed(update, reference, plan)
    # random-rotation gives every client its own rotation, which is its point: identical
    # updates then survive only alone (the 4-client case is checked below to break).
    copies = 1 if name == "random-rotation" else 4
    result = aggregate(name, reference, [update] * copies, [1.0, 2.0, 3.0, 4.0][:copies], plan=plan)
    for module, pair in update.lora.items():
        got = result.adapter.lora[module]
        torch.testing.assert_close(got.B @ got.A, pair.B @ pair.A, rtol=1e-5, atol=1e-5)
        if plan.aligned is None and name != "flexlora":  # nothing rotates or re-factorises
            torch.testing.assert_close(got.A, pair.A)
            torch.testing.assert_close(got.B, pair.B)
    torch.testing.assert_close(
        result.adapter.extra["classifier.weight"], update.extra["classifier.weight"]
    )
    assert result.report.aggregation_error < 1e-5
    for delta in result.base_deltas.values():
        assert delta.abs().max() < 1e-5


def test_random_rotation_breaks_identical_updates() -> None:
    reference, update = adapters(2, seed=7)
    result = aggregate("random-rotation", reference, [update] * 4, [1.0] * 4)
    assert result.report.relative_aggregation_error > 0.3


def rotated_clients(
    n: int, which: Factor, seed: int, device: torch.device | str = "cpu"
) -> tuple[Adapter, list[Adapter]]:
    """One update (A*, B*) in n random bases (A* R^T-rotated, B* R-rotated), and a reference
    whose aligned factor is the update's and whose other factor differs."""
    gen = torch.Generator().manual_seed(seed)
    truth, other = random_adapter(gen, rank=4, head=False), random_adapter(gen, rank=4, head=False)
    clients: list[dict[str, LoraPair]] = [{} for _ in range(n)]
    for module, pair in truth.lora.items():
        rotations = sample_haar_rotation(n, 4, gen)
        for i in range(n):
            clients[i][module] = LoraPair(A=rotations[i].T @ pair.A, B=pair.B @ rotations[i])
    reference = {
        m: LoraPair(
            A=p.A if which is Factor.A else other.lora[m].A,
            B=p.B if which is Factor.B else other.lora[m].B,
        )
        for m, p in truth.lora.items()
    }

    def move(lora: dict[str, LoraPair]) -> Adapter:
        return Adapter({m: LoraPair(p.A.to(device), p.B.to(device)) for m, p in lora.items()})

    return move(reference), [move(c) for c in clients]


@pytest.mark.parametrize("round_index, which", [(1, Factor.A), (2, Factor.B)])
def test_rotated_bases_align_to_zero_error(
    round_index: int, which: Factor, device: torch.device
) -> None:
    reference, clients = rotated_clients(8, which, seed=8, device=device)
    weights = [1.0 + i for i in range(8)]
    hard = aggregate(
        "fedrot",
        reference,
        clients,
        weights,
        round_index=round_index,
        config=StrategyConfig(lam=1.0),
    ).report
    fedit = aggregate("fedit", reference, clients, weights).report
    assert hard.relative_aggregation_error < 1e-5
    assert fedit.relative_aggregation_error > 0.3
    assert hard.factor_average_error < 1e-5 * fedit.factor_average_error
    for client in hard.clients:
        assert len(client.rotations) == len(SHAPES)
        for stats in client.rotations:
            assert stats.residual_after < 2e-3 * stats.residual_before
            assert stats.rotation_distance > 0.1


def test_without_reference_the_first_update_is_the_reference() -> None:
    _, clients = rotated_clients(6, Factor.A, seed=9)
    result = aggregate("fedrot", None, clients, [1.0] * 6, config=StrategyConfig(lam=1.0))
    assert result.report.relative_aggregation_error is None
    assert result.report.aggregation_error < 1e-5
    first = clients[0]
    for module, pair in result.adapter.lora.items():
        torch.testing.assert_close(pair.A, first.lora[module].A, atol=1e-5, rtol=1e-5)
    assert result.report.clients[0].rotations[0].rotation_distance < 1e-5


# --- other strategies against their definitions -------------------------------------------------


def dense_mean(updates: Sequence[Adapter], weights: Sequence[float], module: str) -> torch.Tensor:
    p = normalised(weights)
    return sum(
        pi * (u.lora[module].B.double() @ u.lora[module].A.double())
        for pi, u in zip(p, updates, strict=True)
    )  # type: ignore[return-value]


def test_flexlora_equals_a_dense_truncated_svd(device: torch.device) -> None:
    reference, *updates = adapters(6, seed=10, device=device)
    weights = [2.0, 1.0, 1.0, 3.0, 0.5]
    result = aggregate("flexlora", reference, updates, weights)
    p = normalised(weights)
    for module, pair in result.adapter.lora.items():
        mean = dense_mean(updates, weights, module)
        u, s, vh = torch.linalg.svd(mean)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        torch.testing.assert_close((pair.B @ pair.A).double(), best, rtol=1e-4, atol=1e-5)
        # balanced factors: B^T B = A A^T = diag(s_r)
        torch.testing.assert_close(
            (pair.B.T @ pair.B).double(), torch.diag(s[:3]), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            (pair.A @ pair.A.T).double(), torch.diag(s[:3]), rtol=1e-4, atol=1e-5
        )
        error = next(m for m in result.report.modules if m.module == module)
        As = [u_.lora[module].A for u_ in updates]
        Bs = [u_.lora[module].B for u_ in updates]
        assert error.aggregation_error == pytest.approx(
            dense_error(As, Bs, p, pair.B, pair.A), rel=1e-4
        )
        assert error.aggregation_error == pytest.approx(
            float(s[3:].square().sum().sqrt()), rel=1e-4
        )


def test_fedex_residual_completes_the_factor_average(device: torch.device) -> None:
    reference, *updates = adapters(5, seed=11, device=device)
    weights = [1.0, 2.0, 3.0, 4.0]
    result = aggregate("fedex", reference, updates, weights)
    fedit = aggregate("fedit", reference, updates, weights)
    assert set(result.base_deltas) == set(SHAPES)
    for module, pair in result.adapter.lora.items():
        torch.testing.assert_close(pair.A, fedit.adapter.lora[module].A)
        torch.testing.assert_close(pair.B, fedit.adapter.lora[module].B)
        delta = result.base_deltas[module]
        assert delta.shape == SHAPES[module] and delta.device.type == device.type
        exact = (pair.B @ pair.A + delta).double()
        torch.testing.assert_close(
            exact, dense_mean(updates, weights, module), rtol=1e-5, atol=1e-5
        )
        error = next(m for m in result.report.modules if m.module == module)
        assert error.aggregation_error < 1e-5
        assert error.factor_average_error == pytest.approx(
            float(torch.linalg.matrix_norm(delta)), rel=1e-4
        )
    assert result.report.factor_average_error == pytest.approx(
        fedit.report.aggregation_error, rel=1e-5
    )


def test_flexlora_with_a_rank_above_the_module_size_pads_with_zeros() -> None:
    g = torch.Generator().manual_seed(21)
    shapes = {"m.small": (3, 2), "m.q": (6, 5)}
    reference, *updates = (random_adapter(g, rank=4, shapes=shapes, head=False) for _ in range(4))
    result = aggregate("flexlora", reference, updates, [1.0, 2.0, 3.0])
    small = result.adapter.lora["m.small"]
    assert small.A.shape == (4, 2) and small.B.shape == (3, 4)
    assert not small.A[2:].any() and not small.B[:, 2:].any()  # only 2 singular values exist
    torch.testing.assert_close(
        (small.B @ small.A).double(), dense_mean(updates, [1.0, 2.0, 3.0], "m.small"),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_fedex_residual_also_absorbs_the_rounding_of_bf16_factors() -> None:
    g = torch.Generator().manual_seed(22)
    reference, *updates = (random_adapter(g, dtype=torch.bfloat16) for _ in range(4))
    weights = [1.0, 2.0, 3.0]
    result = aggregate("fedex", reference, updates, weights)
    for module, pair in result.adapter.lora.items():
        assert pair.A.dtype == torch.bfloat16
        delta = result.base_deltas[module]
        assert delta.dtype == torch.float32
        exact = pair.B.double() @ pair.A.double() + delta.double()
        ideal = dense_mean(updates, weights, module)
        torch.testing.assert_close(exact, ideal, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, round_index, frozen",
    [("ffa", 3, Factor.A), ("rolora", 0, Factor.A), ("rolora", 1, Factor.B)],
)
def test_frozen_factors_are_the_references(name: str, round_index: int, frozen: Factor) -> None:
    reference, *updates = adapters(4, seed=12)
    result = aggregate(name, reference, updates, [1.0, 2.0, 3.0], round_index=round_index)
    trained = Factor.B if frozen is Factor.A else Factor.A
    p = normalised([1.0, 2.0, 3.0])
    for module, pair in result.adapter.lora.items():
        assert torch.equal(pair.factor(frozen), reference.lora[module].factor(frozen))
        expected = sum(
            pi * u.lora[module].factor(trained) for pi, u in zip(p, updates, strict=True)
        )
        torch.testing.assert_close(pair.factor(trained), expected)
    assert result.report.aggregation_error == 0.0


def test_scalar_rescaling_matches_the_reference_norm() -> None:
    reference, update = adapters(2, seed=13)
    for round_index, which in ((1, Factor.A), (2, Factor.B)):
        result = aggregate("scalar-rescaling", reference, [update], [1.0], round_index=round_index)
        for module, pair in result.adapter.lora.items():
            torch.testing.assert_close(
                torch.linalg.matrix_norm(pair.factor(which)),
                torch.linalg.matrix_norm(reference.lora[module].factor(which)),
            )
            original = update.lora[module]
            torch.testing.assert_close(
                pair.B @ pair.A, original.B @ original.A, rtol=1e-5, atol=1e-5
            )
            c = torch.linalg.matrix_norm(original.factor(which)) / torch.linalg.matrix_norm(
                reference.lora[module].factor(which)
            )
            torch.testing.assert_close(pair.factor(which), original.factor(which) / c)


def test_random_rotation_is_seeded_and_keeps_products() -> None:
    reference, *updates = adapters(3, seed=14)
    runs = [
        aggregate("random-rotation", reference, updates, [1.0, 1.0], config=StrategyConfig(seed=s))
        for s in (0, 0, 1)
    ]
    a, b, c = (r.adapter.lora["m.q"].A for r in runs)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    single = aggregate("random-rotation", reference, updates[:1], [1.0])
    for module, pair in single.adapter.lora.items():
        original = updates[0].lora[module]
        torch.testing.assert_close(pair.B @ pair.A, original.B @ original.A, rtol=1e-5, atol=1e-5)
    assert all(s.rotation_distance > 0.1 for s in single.report.clients[0].rotations)


# --- dtypes, diagnostics, report ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_reference_keeps_its_dtype(dtype: torch.dtype, device: torch.device) -> None:
    reference, *updates = adapters(4, seed=15, device=device, dtype=dtype)
    result = aggregate("fedrot", reference, updates, [1.0, 1.0, 1.0])
    for tensor in result.adapter.to_state_dict().values():
        assert tensor.dtype == dtype and tensor.device.type == device.type
    assert result.report.aggregation_error > 0


def test_gram_norms_equal_dense_norms() -> None:
    gen = torch.Generator().manual_seed(16)
    k, t, r, d_out, d_in = 3, 5, 2, 7, 6
    Bs = torch.randn(t, k, d_out, r, generator=gen)
    As = torch.randn(t, k, r, d_in, generator=gen)
    coefficients = torch.randn(4, t, generator=gen, dtype=torch.float64)
    coefficients[0] = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0])
    B_rows = torch.cat([b.mT for b in Bs], -2)  # row layout: B^T stacked
    norms = product_sum_norms(B_rows, torch.cat(list(As), -2), coefficients, precise_tail=2)
    for c in range(4):
        dense = sum(coefficients[c, i] * (Bs[i].double() @ As[i].double()) for i in range(t))
        torch.testing.assert_close(
            norms[:, c], torch.linalg.matrix_norm(dense), rtol=1e-5, atol=1e-6
        )
    same = product_sum_norms(
        torch.cat([Bs[0].mT, Bs[0].mT], -2),
        torch.cat([As[0], As[0]], -2),
        torch.tensor([[1.0, -1.0]], dtype=torch.float64),
    )
    assert torch.equal(same, torch.zeros(3, 1, dtype=torch.float64))


def test_report_is_plain_json() -> None:
    reference, *updates = adapters(3, seed=17)
    report = aggregate("fedrot", reference, updates, [1.0, 2.0]).report
    data = json.loads(json.dumps(report.to_dict()))
    assert data["strategy"] == "fedrot" and data["aligned"] == "A" and data["lambda"] == 0.4
    assert data["num_clients"] == 2 and data["total_weight"] == 3.0
    assert data["aggregation_error"] == report.aggregation_error
    assert data["relative_aggregation_error"] == report.relative_aggregation_error
    assert [m["module"] for m in data["modules"]] == ["m.q", "m.v", "m.o"]
    assert {"aggregation_error", "relative_aggregation_error"} <= set(data["modules"][0])
    assert [c["client_id"] for c in data["clients"]] == ["client-0", "client-1"]
    assert len(data["clients"][0]["rotations"]) == 3


# --- misuse -------------------------------------------------------------------------------------


@pytest.fixture
def aggregator_and_reference() -> tuple[object, Adapter]:
    reference = adapters(1, seed=18)[0]
    strategy = build_strategy("fedrot")
    return strategy.start_round(reference, strategy.plan(1)), reference


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_weights_are_refused(aggregator_and_reference, weight: float) -> None:  # type: ignore[no-untyped-def]
    aggregator, reference = aggregator_and_reference
    with pytest.raises(ValueError, match="weight"):
        aggregator.add("c", reference, weight)


def test_schema_mismatches_name_the_key_and_shapes(aggregator_and_reference) -> None:  # type: ignore[no-untyped-def]
    aggregator, reference = aggregator_and_reference
    state = reference.to_state_dict()
    wrong_shape = dict(state, **{"m.q.lora_A.weight": torch.zeros(3, 9)})
    with pytest.raises(SchemaError, match=r"m\.q\.lora_A\.weight.*\(3, 5\).*\(3, 9\)") as info:
        aggregator.add("c", Adapter.from_state_dict(wrong_shape), 1.0)
    assert info.value.key == "m.q.lora_A.weight"
    missing = {k: v for k, v in state.items() if not k.startswith("m.v.")}
    with pytest.raises(SchemaError, match="m.v") as info:
        aggregator.add("c", Adapter.from_state_dict(missing), 1.0)
    extra = dict(state, **{"head.bias": torch.zeros(2)})
    with pytest.raises(SchemaError, match="head.bias") as info:
        aggregator.add("c", Adapter.from_state_dict(extra), 1.0)
    assert info.value.key == "head.bias"
    lower_rank = adapters(1, seed=19, rank=2)[0]
    with pytest.raises(SchemaError, match=r"\(3, 5\).*\(2, 5\)"):
        aggregator.add("c", lower_rank, 1.0)
    aggregator.add("c", reference, 1.0)  # the failed adds left no trace
    assert aggregator.finalize().report.num_clients == 1


def test_state_errors(aggregator_and_reference) -> None:  # type: ignore[no-untyped-def]
    aggregator, reference = aggregator_and_reference
    with pytest.raises(AggregationStateError, match="no update"):
        aggregator.finalize()
    aggregator.add("c", reference, 1.0)
    with pytest.raises(AggregationStateError, match="already added"):
        aggregator.add("c", reference, 1.0)
    aggregator.finalize()
    with pytest.raises(AggregationStateError, match="finalised"):
        aggregator.add("d", reference, 1.0)
    with pytest.raises(AggregationStateError, match="finalised"):
        aggregator.finalize()


# --- grouping -----------------------------------------------------------------------------------


def test_groups_are_split_by_size_without_changing_results(monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    import fedrot.aggregation
    from fedrot.adapters import AdapterSchema
    from fedrot.module_groups import group_modules

    reference, *updates = adapters(4, seed=20)
    groups = group_modules(AdapterSchema.of(reference))
    assert [g.modules for g in groups] == [("m.q", "m.v"), ("m.o",)]
    one_each = group_modules(AdapterSchema.of(reference), max_group_bytes=1)
    assert [g.modules for g in one_each] == [("m.q",), ("m.v",), ("m.o",)]
    assert [g.index for g in one_each] == [0, 1, 2]
    for name in ("fedrot", "random-rotation", "scalar-rescaling", "fedit", "flexlora"):
        whole = aggregate(name, reference, updates, [1.0, 2.0, 3.0])
        with monkeypatch.context() as patch:
            split = functools.partial(group_modules, max_group_bytes=1)
            patch.setattr(fedrot.aggregation, "group_modules", split)
            parts = aggregate(name, reference, updates, [1.0, 2.0, 3.0])
        for key, tensor in whole.adapter.to_state_dict().items():
            assert rel_diff(parts.adapter.to_state_dict()[key], tensor) < 1e-6, (name, key)
        assert parts.report.aggregation_error == pytest.approx(whole.report.aggregation_error)


STRATEGY_ROUNDS = [
    ("fedrot", 1),
    ("fedrot", 2),
    ("fedit", 1),
    ("ffa", 3),
    ("rolora", 1),
    ("random-rotation", 1),
    ("scalar-rescaling", 2),
]


@pytest.mark.parametrize("name, round_index", STRATEGY_ROUNDS)
@pytest.mark.parametrize("track_error", [False, True])
def test_streamed_modules_equal_stacked_ones(
    name: str, round_index: int, track_error: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Modules handled one by one from the update's tensors (as large modules are) give the
    stacked batch's adapter, rotation statistics and errors; so does a mixed-dtype round."""
    import fedrot.module_groups

    reference, *updates = adapters(5, seed=21)
    mixed = {
        m: LoraPair(p.A.to(torch.bfloat16), p.B.to(torch.float16))
        for m, p in updates[1].lora.items()
    }
    updates[1] = Adapter(mixed, dict(updates[1].extra))
    weights = [1.0, 2.0, 3.0, 0.5]
    config = StrategyConfig(lam=0.4)
    kw = {"round_index": round_index, "config": config, "track_error": track_error}
    stacked = aggregate(name, reference, updates, weights, **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(fedrot.module_groups, "STREAM_MODULE_BYTES", 0)
    streamed = aggregate(name, reference, updates, weights, **kw)  # type: ignore[arg-type]
    for key, tensor in stacked.adapter.to_state_dict().items():
        got = streamed.adapter.to_state_dict()[key]
        assert got.dtype == tensor.dtype and got.is_contiguous()
        assert rel_diff(got, tensor) < 1e-6, key
    for mine, theirs in zip(streamed.report.clients, stacked.report.clients, strict=True):
        for a, b in zip(mine.rotations, theirs.rotations, strict=True):
            assert a.module == b.module
            assert a.rotation_distance == pytest.approx(b.rotation_distance, abs=1e-5)
            assert a.residual_after == pytest.approx(b.residual_after, rel=1e-4, abs=1e-5)
    if track_error:
        assert streamed.report.aggregation_error == pytest.approx(
            stacked.report.aggregation_error, rel=1e-5, abs=1e-9
        )


def test_the_first_update_overwrites_uninitialised_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Running sums start uninitialised and the first update is written, not added: garbage
    (here NaN) in fresh storage never reaches the result."""
    import fedrot.factor_aggregation

    real_empty = torch.empty

    def nan_empty(*args, **kwargs):  # type: ignore[no-untyped-def]
        return real_empty(*args, **kwargs).fill_(float("nan"))

    reference, *updates = adapters(3, seed=22)
    for name in ("fedrot", "fedit"):
        expected = aggregate(name, reference, updates, [1.0, 2.0])
        with monkeypatch.context() as patch:
            patch.setattr(fedrot.factor_aggregation.torch, "empty", nan_empty)
            got = aggregate(name, reference, updates, [1.0, 2.0])
        for key, tensor in got.adapter.to_state_dict().items():
            assert torch.isfinite(tensor).all(), (name, key)
            torch.testing.assert_close(tensor, expected.adapter.to_state_dict()[key])
