"""The rotation drift diagnostic and FedIT's error for the same uploads: the r x r formulas
against dense float64 computations, and what the aggregators report."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from adapter_factories import SHAPES
from test_aggregation import (
    MIXED_SHAPES,
    adapters,
    aggregate,
    dense_error,
    normalised,
    proper_polar,
    rotated_clients,
)
from test_error_tracking import DENSE, STRIPS, WIDE_SHAPES, near_reference_clients, with_budgets

from fedrot.adapters import Adapter, Factor
from fedrot.aggregation import AggregationResult
from fedrot.alignment import procrustes_rotation, sample_haar_rotation, soften_rotation
from fedrot.drift import (
    ModuleDrift,
    drift_before,
    drift_removed,
    orthonormalised,
    round_drift_shares,
    signed_nuclear_norm,
)
from fedrot.strategies import StrategyConfig

# --- the r x r formulas against dense ones --------------------------------------------------------


def random_problem(
    gen: torch.Generator, k: int, rank: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-layout ``X_i``, ``X_ref`` ``(k, r, d)`` float64, ``X_i`` a rotated, perturbed copy of
    the reference for half of the modules and unrelated for the rest."""
    reference = torch.randn(k, rank, width, generator=gen, dtype=torch.float64)
    rotations = sample_haar_rotation(k, rank, gen, dtype=torch.float64)
    noise = torch.randn(k, rank, width, generator=gen, dtype=torch.float64)
    moving = rotations @ reference + 0.3 * noise
    moving[k // 2 :] = torch.randn(k - k // 2, rank, width, generator=gen, dtype=torch.float64)
    return moving, reference


def squared(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=(-2, -1)).square()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_signed_nuclear_norm_is_the_best_proper_rotations_trace(seed: int, rank: int) -> None:
    """``max_{R in SO(r)} tr(R^T M)``: attained by the det +1 polar factor, never beaten by a
    random proper rotation, and below the plain nuclear norm exactly when ``det M < 0``."""
    gen = torch.Generator().manual_seed(seed)
    cross = torch.randn(16, rank, rank, generator=gen, dtype=torch.float64)
    best = signed_nuclear_norm(cross)
    for k in range(16):
        polar = proper_polar(cross[k])
        assert float(torch.trace(polar.T @ cross[k])) == pytest.approx(float(best[k]), rel=1e-12)
        if rank > 1:
            trials = sample_haar_rotation(200, rank, gen, dtype=torch.float64)
            traces = (trials * cross[k]).sum((-2, -1))
            assert float(traces.max()) <= float(best[k]) + 1e-12
    nuclear = torch.linalg.matrix_norm(cross, ord="nuc")
    negative = torch.linalg.det(cross) < 0
    assert torch.allclose(best[~negative], nuclear[~negative], rtol=1e-12)
    if negative.any():
        assert bool((best[negative] < nuclear[negative]).all())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rank, width", [(2, 9), (4, 31), (8, 64)])
def test_drift_terms_equal_the_dense_distances(seed: int, rank: int, width: int) -> None:
    """``||X_i - X_ref||^2`` and what the optimal / a soft rotation remove, from ``M``, the two
    norms and ``R``, against the distances computed on the ``(r, d)`` factors."""
    gen = torch.Generator().manual_seed(100 + seed)
    moving, reference = random_problem(gen, 12, rank, width)
    cross32 = (moving @ reference.mT).float()
    before = drift_before(cross32, squared(moving).float(), squared(reference).float())
    dense_before = squared(moving - reference)
    scale = squared(moving) + squared(reference)
    assert torch.allclose(before, dense_before, rtol=1e-5, atol=1e-6 * float(scale.max()))

    hard = torch.stack([proper_polar(m) for m in moving @ reference.mT])
    dense_removed = dense_before - squared(hard.mT @ moving - reference)
    removed = drift_removed(cross32, orthonormalised(procrustes_rotation(cross32)))
    tolerance = 1e-5 * float(scale.max())
    assert torch.allclose(removed, dense_removed, rtol=1e-5, atol=tolerance)
    cross = moving @ reference.mT
    via_svd = 2.0 * (signed_nuclear_norm(cross) - torch.einsum("kii->k", cross))
    assert torch.allclose(via_svd, dense_removed, rtol=1e-10, atol=1e-10)

    soft = soften_rotation(procrustes_rotation(cross32), 0.4)
    dense_soft = dense_before - squared(soft.double().mT @ moving - reference)
    applied = drift_removed(cross32, orthonormalised(soft))
    assert torch.allclose(applied, dense_soft, rtol=1e-4, atol=tolerance)
    assert bool((applied <= removed + tolerance).all())


def test_a_scaled_gauge_removes_what_the_dense_distance_says() -> None:
    gen = torch.Generator().manual_seed(7)
    moving, reference = random_problem(gen, 6, 3, 11)
    cross = moving @ reference.mT
    scale = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    eye = torch.eye(3, dtype=torch.float64).expand(6, 3, 3)
    got = drift_removed(cross, eye, scale, squared(moving))
    expected = squared(moving - reference) - squared(scale[:, None, None] * moving - reference)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="moving_sq"):
        drift_removed(cross, eye, scale)


def test_the_identity_removes_nothing_and_shares_are_drift_weighted() -> None:
    gen = torch.Generator().manual_seed(8)
    moving, reference = random_problem(gen, 5, 4, 10)
    eye = torch.eye(4).expand(5, 4, 4)
    removed = drift_removed(moving @ reference.mT, eye)
    assert torch.equal(removed, torch.zeros(5, dtype=torch.float64))
    drifts = [ModuleDrift("a", 4.0, 1.0, 0.5), ModuleDrift("b", 1.0, 1.0, 1.0),
              ModuleDrift("c", 0.0, 0.0, 0.0)]  # fmt: skip
    assert round_drift_shares(drifts) == pytest.approx((2.0 / 5.0, 1.5 / 5.0))
    assert drifts[2].share == 0.0 and drifts[0].share == 0.25
    assert round_drift_shares([]) == (None, None)


# --- what the aggregators report ------------------------------------------------------------------


def dense_round_drift(
    reference: Adapter, clients: Sequence[Adapter], weights: Sequence[float], which: Factor,
    lam: float,
) -> dict[str, tuple[float, float, float]]:  # fmt: skip
    """Per module, float64 from the factors: (sum p_i ||X_i - X_ref||^2, the part the optimal
    proper rotations remove, the part the lambda-soft ones remove)."""
    p = normalised(weights)
    out = {}
    for module, ref in reference.lora.items():
        x_ref = ref.A.double() if which is Factor.A else ref.B.double().T
        before = removed = applied = 0.0
        for pi, client in zip(p, clients, strict=True):
            pair = client.lora[module]
            x = pair.A.double() if which is Factor.A else pair.B.double().T
            hard = proper_polar(x @ x_ref.T)
            eye = torch.eye(hard.shape[0], dtype=torch.float64)
            soft = proper_polar((1 - lam) * eye + lam * hard)
            drift = float(squared(x - x_ref))
            before += pi * drift
            removed += pi * (drift - float(squared(hard.T @ x - x_ref)))
            applied += pi * (drift - float(squared(soft.T @ x - x_ref)))
        out[module] = (before, removed, applied)
    return out


@pytest.mark.parametrize("lam", [0.4, 1.0])
@pytest.mark.parametrize("round_index, which", [(1, Factor.A), (2, Factor.B)])
@pytest.mark.parametrize("streamed", [False, True], ids=["stacked", "streamed"])
def test_fedrot_reports_the_dense_drift(
    lam: float, round_index: int, which: Factor, streamed: bool, device: torch.device,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import fedrot.module_groups

    if streamed:
        monkeypatch.setattr(fedrot.module_groups, "STREAM_MODULE_BYTES", 512)
    reference, *clients = adapters(6, seed=41, shapes=MIXED_SHAPES, device=device)
    weights = [1.0, 2.5, 0.5, 3.0, 1.25]
    report = aggregate("fedrot", reference, clients, weights, round_index=round_index,
                       config=StrategyConfig(lam=lam)).report  # fmt: skip
    cpu = [Adapter.from_state_dict({k: t.cpu() for k, t in a.to_state_dict().items()})
           for a in (reference, *clients)]  # fmt: skip
    expected = dense_round_drift(cpu[0], cpu[1:], weights, which, lam)
    assert [d.module for d in report.drift] == [m.module for m in report.modules]
    for drift in report.drift:
        before, removed, applied = expected[drift.module]
        assert drift.drift == pytest.approx(before, rel=1e-5)
        assert drift.removed == pytest.approx(removed, rel=1e-4, abs=1e-5 * before)
        assert drift.applied_removed == pytest.approx(applied, rel=1e-4, abs=1e-5 * before)
        assert 0.0 < drift.share < 1.0
    total = sum(v[0] for v in expected.values())
    assert report.rotation_drift_share == pytest.approx(
        sum(v[1] for v in expected.values()) / total, rel=1e-4
    )
    assert report.applied_rotation_drift_share == pytest.approx(
        sum(v[2] for v in expected.values()) / total, rel=1e-4
    )
    if lam == 1.0:
        assert report.applied_rotation_drift_share == report.rotation_drift_share
    else:
        assert report.applied_rotation_drift_share < report.rotation_drift_share
    data = report.to_dict()
    assert data["rotation_drift_share"] == report.rotation_drift_share
    assert {d["module"] for d in data["rotation_drift"]} == set(MIXED_SHAPES)


@pytest.mark.parametrize("round_index, which", [(1, Factor.A), (2, Factor.B)])
def test_rotated_copies_have_all_their_drift_explained(round_index: int, which: Factor) -> None:
    reference, clients = rotated_clients(6, which, seed=9)
    report = aggregate("fedrot", reference, clients, [1.0] * 6, round_index=round_index,
                       config=StrategyConfig(lam=1.0)).report  # fmt: skip
    assert report.rotation_drift_share == pytest.approx(1.0, abs=1e-6)
    assert report.rotation_drift_share <= 1.0  # each client's removal is capped at its drift


def test_the_optimal_share_is_a_property_of_the_uploads() -> None:
    """FedRot (any lambda) and the ablations see the same optimal rotations; what their own
    gauges remove differs (a random rotation adds drift)."""
    reference, *clients = adapters(5, seed=43)
    weights = [1.0, 2.0, 3.0, 0.5]
    reports = {
        (name, lam): aggregate(name, reference, clients, weights,
                               config=StrategyConfig(lam=lam)).report  # fmt: skip
        for name, lam in [("fedrot", 0.4), ("fedrot", 1.0), ("random-rotation", 0.4),
                          ("scalar-rescaling", 0.4)]  # fmt: skip
    }
    optimal = reports[("fedrot", 1.0)].rotation_drift_share
    for report in reports.values():
        assert report.rotation_drift_share == pytest.approx(optimal, rel=1e-5)
    for ablation in ("random-rotation", "scalar-rescaling"):
        applied = reports[(ablation, 0.4)].applied_rotation_drift_share
        assert applied < optimal - 0.05


@pytest.mark.parametrize("name, round_index", [("fedit", 1), ("fedrot", 0), ("ffa", 1),
                                               ("flexlora", 1), ("fedex", 1)])  # fmt: skip
def test_rounds_without_a_gauge_report_no_drift(name: str, round_index: int) -> None:
    reference, *clients = adapters(4, seed=44)
    report = aggregate(name, reference, clients, [1.0, 2.0, 3.0], round_index=round_index).report
    assert report.drift == () and report.rotation_drift_share is None
    assert report.to_dict()["rotation_drift"] == []


def test_lambda_zero_reports_no_drift() -> None:
    reference, *clients = adapters(4, seed=45)
    report = aggregate("fedrot", reference, clients, [1.0, 2.0, 3.0],
                       config=StrategyConfig(lam=0.0)).report  # fmt: skip
    assert report.rotation_drift_share is None


# --- FedIT's error for the same uploads -----------------------------------------------------------


def fedit_dense(reference: Adapter, clients: Sequence[Adapter], weights: Sequence[float],
                module: str) -> tuple[float, float]:  # fmt: skip
    """``(||S - B~ A~||, ||S - B_ref A_ref||)`` in float64 with the uploads' own factors."""
    p = normalised(weights)
    As = [c.lora[module].A.double() for c in clients]
    Bs = [c.lora[module].B.double() for c in clients]
    mean_A = sum(pi * a for pi, a in zip(p, As, strict=True))
    mean_B = sum(pi * b for pi, b in zip(p, Bs, strict=True))
    ref = reference.lora[module]
    fedit = dense_error(As, Bs, p, mean_B, mean_A)  # type: ignore[arg-type]
    return fedit, dense_error(As, Bs, p, ref.B, ref.A)


def run_paths(
    monkeypatch: pytest.MonkeyPatch, budgets: dict[str, float] | None, *args: object, **kw: object
) -> AggregationResult:
    if budgets is None:
        return aggregate(*args, **kw)  # type: ignore[arg-type]
    run = lambda: aggregate(*args, **kw)  # type: ignore[arg-type]  # noqa: E731
    return with_budgets(monkeypatch, budgets, run)


GAUGED_CASES = [
    pytest.param("fedrot", 1, None, False, id="fedrot-A-gram-stacked"),
    pytest.param("fedrot", 2, None, True, id="fedrot-B-gram-streamed"),
    pytest.param("fedrot", 1, DENSE, True, id="fedrot-A-dense-streamed"),
    pytest.param("fedrot", 2, DENSE, False, id="fedrot-B-dense-stacked"),
    pytest.param("fedrot", 1, STRIPS, False, id="fedrot-A-strips-stacked"),
    pytest.param("fedrot", 2, STRIPS, True, id="fedrot-B-strips-streamed"),
    pytest.param("random-rotation", 1, DENSE, False, id="random-dense-stacked"),
    pytest.param("random-rotation", 2, None, True, id="random-gram-streamed"),
    pytest.param("scalar-rescaling", 2, STRIPS, True, id="scalar-strips-streamed"),
    pytest.param("scalar-rescaling", 1, None, False, id="scalar-gram-stacked"),
]


@pytest.mark.parametrize("name, round_index, budgets, streamed", GAUGED_CASES)
def test_fedit_error_of_a_gauged_round_equals_fedits_own(
    name: str, round_index: int, budgets: dict[str, float] | None, streamed: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The FedIT-equivalent error of a gauged round is the error FedIT reports for the same
    uploads and the float64 formula, on the Gram, dense and midway paths."""
    import fedrot.module_groups

    if streamed:
        monkeypatch.setattr(fedrot.module_groups, "STREAM_MODULE_BYTES", 0)
    reference, clients = near_reference_clients(12, seed=46, shapes=WIDE_SHAPES)
    weights = [1.0 + 0.37 * i for i in range(12)]
    config = StrategyConfig(lam=0.4)
    gauged = run_paths(monkeypatch, budgets, name, reference, clients, weights,
                       round_index=round_index, config=config).report  # fmt: skip
    plain = aggregate("fedit", reference, clients, weights).report
    assert gauged.fedit_aggregation_error == pytest.approx(plain.aggregation_error, rel=1e-4)
    assert gauged.fedit_relative_aggregation_error == pytest.approx(
        plain.relative_aggregation_error, rel=1e-4
    )
    for error in gauged.modules:
        fedit, update = fedit_dense(reference, clients, weights, error.module)
        assert error.fedit_aggregation_error == pytest.approx(fedit, rel=1e-4)
        assert error.fedit_relative_aggregation_error == pytest.approx(fedit / update, rel=1e-4)
        if name == "fedrot":  # the rotations changed the error
            assert error.fedit_aggregation_error != pytest.approx(error.aggregation_error, rel=1e-3)
    removed = gauged.error_removed_share
    ratio = gauged.aggregation_error / plain.aggregation_error
    assert removed == pytest.approx(1.0 - ratio, abs=1e-4)
    if name == "fedrot":
        assert removed > 0.0


@pytest.mark.parametrize("budgets", [None, DENSE], ids=["gram", "dense"])
@pytest.mark.parametrize("name, round_index", [("fedit", 1), ("fedrot", 0), ("rolora", 1),
                                               ("flexlora", 1), ("fedex", 1)])  # fmt: skip
def test_without_a_gauge_fedits_error_is_the_factor_average_one(
    name: str, round_index: int, budgets: dict[str, float] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under FedIT it is the round's own error; under FlexLoRA and FedEx (which do not average
    factors) the factor-average error, against the float64 formula."""
    reference, clients = near_reference_clients(6, seed=47, shapes=WIDE_SHAPES)
    weights = [2.0, 1.0, 1.0, 3.0, 0.5, 1.25]
    result = run_paths(monkeypatch, budgets, name, reference, clients, weights,
                       round_index=round_index)  # fmt: skip
    report = result.report
    for error in report.modules:
        assert error.fedit_aggregation_error == error.factor_average_error
        if name in ("fedit", "fedrot"):
            assert error.fedit_aggregation_error == pytest.approx(error.aggregation_error, rel=1e-9)
        if name != "rolora":  # RoLoRA's uploads are completed from the reference in the server
            fedit, _ = fedit_dense(reference, clients, weights, error.module)
            assert error.fedit_aggregation_error == pytest.approx(fedit, rel=1e-4)
    assert report.fedit_aggregation_error == report.factor_average_error
    if name in ("fedit", "fedrot"):
        assert report.error_removed_share == pytest.approx(0.0, abs=1e-9)


def test_untracked_rounds_report_no_fedit_error_but_still_drift() -> None:
    reference, *clients = adapters(4, seed=48)
    report = aggregate("fedrot", reference, clients, [1.0, 2.0, 3.0], track_error=False).report
    assert report.fedit_aggregation_error is None and report.error_removed_share is None
    assert report.rotation_drift_share is not None
    assert len(report.drift) == len(SHAPES)
