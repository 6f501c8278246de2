"""Property tests of the batched alignment math (fedrot.alignment)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrot.adapters import Factor
from fedrot.alignment import (
    POLAR_FLOOR,
    POLAR_QUICK_FLOOR,
    align_to_reference,
    as_rows,
    cross_gram,
    expanded_gauge_statistics,
    gauge_statistics,
    nearest_rotation,
    newton_schulz_schedule,
    polar_by_iteration,
    procrustes_rotation,
    rotate_factors,
    sample_haar_rotation,
    soften_rotation,
)

FAST = settings(max_examples=25, deadline=None)


def assert_rotations(rotation: torch.Tensor, atol: float = 1e-5) -> None:
    """Every ``(r, r)`` matrix of the stack is orthogonal with determinant +1."""
    eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
    torch.testing.assert_close(rotation @ rotation.mT, eye.expand_as(rotation), atol=atol, rtol=0)
    dets = torch.linalg.det(rotation.double())
    torch.testing.assert_close(dets, torch.ones_like(dets), atol=atol, rtol=0)


def haar(count: int, rank: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    rotations = sample_haar_rotation(count, rank, torch.Generator().manual_seed(seed))
    return rotations.to(device)


def reflection(count: int, rank: int, seed: int) -> torch.Tensor:
    """Orthogonal matrices with determinant -1: a Haar rotation times diag(1, ..., 1, -1)."""
    flip = torch.ones(rank)
    flip[-1] = -1.0
    return haar(count, rank, seed) * flip


def random_factors(
    k: int, rank: int, d_out: int, d_in: int, seed: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(k, rank, d_in, generator=gen).to(device),
        torch.randn(k, d_out, rank, generator=gen).to(device),
    )


@FAST
@given(k=st.integers(1, 4), rank=st.integers(1, 6), seed=st.integers(0, 2**16), flip=st.booleans())
def test_procrustes_gives_proper_rotations(k: int, rank: int, seed: int, flip: bool) -> None:
    """R is orthogonal with det +1, also when the best orthogonal fit is a reflection."""
    gen = torch.Generator().manual_seed(seed)
    cross = torch.randn(k, rank, rank, generator=gen)
    if flip:
        cross = reflection(k, rank, seed) @ torch.diag_embed(
            torch.rand(k, rank, generator=gen) + 0.1
        )
        unconstrained = torch.linalg.svd(cross)
        assert (torch.linalg.det(unconstrained.U @ unconstrained.Vh) < 0).all()
    assert_rotations(procrustes_rotation(cross))


@FAST
@given(rank=st.integers(2, 5), seed=st.integers(0, 2**16), flip=st.booleans())
def test_procrustes_beats_every_sampled_rotation(rank: int, seed: int, flip: bool) -> None:
    """R maximises trace(R^T M) over SO(r): no Haar sample does better."""
    gen = torch.Generator().manual_seed(seed)
    cross = torch.randn(1, rank, rank, generator=gen)
    if flip:
        cross = reflection(1, rank, seed) @ torch.diag_embed(
            torch.rand(1, rank, generator=gen) + 0.1
        )
    best = (procrustes_rotation(cross) * cross).sum()
    samples = haar(500, rank, seed + 1)
    assert (samples * cross).sum((-2, -1)).max() <= best + 1e-5


def test_reflection_fix_negates_the_smallest_direction() -> None:
    """With M = P diag(s), P a reflection, R flips the direction of the smallest s."""
    cross = torch.diag(torch.tensor([3.0, 2.0, -0.5]))[None]
    expected = torch.diag(torch.tensor([1.0, 1.0, 1.0]))[None]
    torch.testing.assert_close(procrustes_rotation(cross), expected)
    cross = torch.diag(torch.tensor([-3.0, 2.0, 0.5]))[None]
    expected = torch.diag(torch.tensor([-1.0, 1.0, -1.0]))[None]
    torch.testing.assert_close(procrustes_rotation(cross), expected)


@pytest.mark.parametrize("which", list(Factor))
def test_procrustes_recovers_a_known_rotation(which: Factor, device: torch.device) -> None:
    """If X_i = Q^T X_ref in row layout (A_i = Q^T A_ref, B_i = B_ref Q) then R = Q."""
    A_ref, B_ref = random_factors(5, 4, 9, 8, seed=3, device=device)
    rotation = haar(5, 4, seed=4, device=device)
    A_i, B_i = rotate_factors(A_ref, B_ref, rotation)
    moving = as_rows(A_i if which is Factor.A else B_i, which)
    reference = as_rows(A_ref if which is Factor.A else B_ref, which)
    solved = procrustes_rotation(cross_gram(moving, reference))
    torch.testing.assert_close(solved, rotation.mT, atol=1e-5, rtol=0)
    aligned = align_to_reference(A_i, B_i, A_ref, B_ref, which, lam=1.0)
    torch.testing.assert_close(aligned.A, A_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aligned.B, B_ref, atol=1e-5, rtol=1e-5)
    # residual_after comes from r x r blocks: its resolution is ~1e-3 of residual_before.
    assert aligned.statistics.residual_after.max() < 2e-3 * aligned.statistics.residual_before.min()


@FAST
@given(
    rank=st.integers(1, 6),
    which=st.sampled_from(list(Factor)),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_alignment_preserves_every_product(rank: int, which: Factor, lam: float, seed: int) -> None:
    """B_i A_i is unchanged by the alignment (to 1e-5) and R is a proper rotation."""
    A, B = random_factors(3, rank, 7, 6, seed)
    A_ref, B_ref = random_factors(3, rank, 7, 6, seed + 1)
    aligned = align_to_reference(A, B, A_ref, B_ref, which, lam)
    assert_rotations(aligned.rotation)
    torch.testing.assert_close(aligned.B @ aligned.A, B @ A, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", list(Factor))
def test_lambda_zero_is_the_identity_exactly(which: Factor, device: torch.device) -> None:
    A, B = random_factors(4, 3, 7, 6, seed=5, device=device)
    A_ref, B_ref = random_factors(4, 3, 7, 6, seed=6, device=device)
    aligned = align_to_reference(A, B, A_ref, B_ref, which, lam=0.0)
    assert torch.equal(aligned.A, A) and torch.equal(aligned.B, B)
    assert torch.equal(aligned.rotation, torch.eye(3, device=device).expand(4, 3, 3))
    torch.testing.assert_close(
        aligned.statistics.residual_after, aligned.statistics.residual_before
    )
    assert torch.equal(aligned.statistics.rotation_distance, torch.zeros(4, device=device))


@FAST
@given(angle=st.floats(-3.0, 3.0), lam=st.floats(0.0, 1.0))
def test_soft_rotation_interpolates_the_angle_in_the_plane(angle: float, lam: float) -> None:
    """polar((1 - lam) I + lam R(angle)) = R(atan2(lam sin, 1 - lam + lam cos)) in 2-D."""

    def planar(theta: float) -> torch.Tensor:
        c, s = math.cos(theta), math.sin(theta)
        return torch.tensor([[[c, -s], [s, c]]])

    soft = soften_rotation(planar(angle), lam)
    expected = math.atan2(lam * math.sin(angle), 1 - lam + lam * math.cos(angle))
    torch.testing.assert_close(soft, planar(expected), atol=1e-5, rtol=0)


@FAST
@given(
    k=st.integers(1, 4), rank=st.integers(1, 6), lam=st.floats(0.0, 1.0), seed=st.integers(0, 99)
)
def test_soft_rotations_are_proper(k: int, rank: int, lam: float, seed: int) -> None:
    rotation = haar(k, rank, seed)
    soft = soften_rotation(rotation, lam)
    assert_rotations(soft)
    if lam == 1.0:
        assert torch.equal(soft, rotation)


def test_soft_rotation_rejects_lambda_outside_the_unit_interval() -> None:
    with pytest.raises(ValueError, match="lambda"):
        soften_rotation(haar(1, 2, 0), 1.5)


def test_nearest_rotation_of_a_rotation_is_itself(device: torch.device) -> None:
    rotation = haar(6, 5, seed=7, device=device)
    torch.testing.assert_close(nearest_rotation(rotation), rotation, atol=1e-5, rtol=0)


def test_haar_rotations_are_proper_seeded_and_centred() -> None:
    samples = haar(4000, 3, seed=11)
    assert_rotations(samples)
    assert torch.equal(samples, haar(4000, 3, seed=11))
    assert not torch.equal(samples, haar(4000, 3, seed=12))
    # E[R] = 0 under Haar measure on SO(r), r >= 2; entries have variance 1/r.
    assert samples.mean(0).abs().max() < 0.05


@pytest.mark.parametrize("which", list(Factor))
@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_statistics_match_their_dense_definitions(
    which: Factor, lam: float, device: torch.device
) -> None:
    A, B = random_factors(3, 4, 8, 6, seed=21, device=device)
    A_ref, B_ref = random_factors(3, 4, 8, 6, seed=22, device=device)
    aligned = align_to_reference(A, B, A_ref, B_ref, which, lam)
    before = (A - A_ref) if which is Factor.A else (B - B_ref)
    after = (aligned.A - A_ref) if which is Factor.A else (aligned.B - B_ref)
    eye = torch.eye(4, device=device)
    stats = aligned.statistics
    torch.testing.assert_close(stats.residual_before.float(), torch.linalg.matrix_norm(before))
    torch.testing.assert_close(stats.residual_after.float(), torch.linalg.matrix_norm(after))
    torch.testing.assert_close(
        stats.rotation_distance.float(), torch.linalg.matrix_norm(aligned.rotation - eye)
    )
    if lam == 1.0:  # the identity is a candidate, so the optimum is no worse
        assert (stats.residual_after <= stats.residual_before + 1e-5).all()


def test_identical_factors_have_zero_residual() -> None:
    A, B = random_factors(2, 3, 5, 4, seed=1)
    aligned = align_to_reference(A, B, A, B, Factor.A, lam=1.0)
    assert torch.equal(aligned.statistics.residual_before, torch.zeros(2))
    assert aligned.statistics.residual_after.max() < 1e-5


def test_scaled_gauge_statistics_match_the_dense_residual() -> None:
    """The statistics of X <- s R^T X agree with the residual computed on the dense factor."""
    A, _ = random_factors(3, 4, 8, 6, seed=31)
    A_ref, _ = random_factors(3, 4, 8, 6, seed=32)
    rotation = haar(3, 4, seed=33)
    scale = torch.tensor([0.5, 1.0, 2.0])
    diff = A - A_ref
    stats = gauge_statistics(
        rotation,
        scale,
        cross_gram(diff, A_ref),
        cross_gram(A_ref, A_ref),
        torch.linalg.matrix_norm(diff).square(),
    )
    moved = scale[:, None, None] * (rotation.mT @ A)
    torch.testing.assert_close(
        stats.residual_after.float(), torch.linalg.matrix_norm(moved - A_ref)
    )
    eye = torch.eye(4)
    expected = torch.linalg.matrix_norm(scale[:, None, None] * rotation.mT - eye)
    torch.testing.assert_close(stats.rotation_distance.float(), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_aligned_in_float32(
    dtype: torch.dtype, device: torch.device
) -> None:
    A, B = random_factors(2, 4, 8, 6, seed=41, device=device)
    A_ref, B_ref = random_factors(2, 4, 8, 6, seed=42, device=device)
    aligned = align_to_reference(
        A.to(dtype), B.to(dtype), A_ref.to(dtype), B_ref.to(dtype), Factor.B, lam=0.5
    )
    assert aligned.A.dtype == aligned.B.dtype == aligned.rotation.dtype == torch.float32
    assert_rotations(aligned.rotation)
    expected = B.to(dtype).float() @ A.to(dtype).float()
    torch.testing.assert_close(aligned.B @ aligned.A, expected, atol=1e-5, rtol=1e-5)


# --- the Newton-Schulz polar path and its SVD fallback ------------------------------------------


def svd_rotation(matrix: torch.Tensor) -> torch.Tensor:
    """Float64 reference: U V^T with the smallest singular direction flipped when det < 0."""
    u, _, vh = torch.linalg.svd(matrix.double())
    flip = torch.ones(matrix.shape[:-1], dtype=torch.float64)
    flip[..., -1] = torch.linalg.det(u @ vh).sign()
    return u @ (flip[..., :, None] * vh)


def with_singular_values(
    rotations_u: torch.Tensor, values: torch.Tensor, seed: int
) -> torch.Tensor:
    """``U diag(values) V^T`` with ``U`` given and ``V`` a Haar rotation."""
    v = haar(rotations_u.shape[0], rotations_u.shape[-1], seed)
    return rotations_u @ torch.diag_embed(values) @ v.mT


@pytest.mark.parametrize("lower", [1e-3, 0.01, 0.1, 0.2, 0.5])
def test_newton_schulz_schedule_reaches_one_from_its_lower_bound(lower: float) -> None:
    """The scalar map of the schedule takes every singular value in [lower, 1] to 1."""
    sigma = torch.linspace(lower, 1.0, 2001, dtype=torch.float64)
    for alpha in newton_schulz_schedule(lower):
        sigma = 0.5 * alpha * sigma * (3.0 - alpha**2 * sigma**2)
    assert (sigma - 1.0).abs().max() < 1e-6


@FAST
@given(k=st.integers(1, 8), rank=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_iterative_procrustes_matches_the_svd(k: int, rank: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    cross = torch.randn(k, rank, rank, generator=gen)
    expected = svd_rotation(cross)
    got = procrustes_rotation(cross)
    assert_rotations(got)
    # Both solve the same problem; where M is ill-conditioned the solution itself moves with
    # the round-off of M, so compare the objective trace(R^T M) rather than R.
    objective = (got.double() * cross.double()).sum((-2, -1))
    best = (expected * cross.double()).sum((-2, -1))
    torch.testing.assert_close(objective, best, atol=1e-4, rtol=1e-5)


def test_well_conditioned_crosses_are_settled_by_the_iteration(device: torch.device) -> None:
    """Rotated Gram matrices (cond ~ 1.3, as in training) converge without the SVD, to the
    SVD's answer."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(16, 8, 512, generator=gen)
    cross = (haar(16, 8, seed=4) @ (rows @ rows.mT)).to(device)
    _, converged = polar_by_iteration(cross, POLAR_QUICK_FLOOR, normalise=True)
    assert converged is not None and bool(converged.all())
    torch.testing.assert_close(
        procrustes_rotation(cross).double().cpu(), svd_rotation(cross.cpu()), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("smallest", [1e-4, 1e-7, 0.0])
def test_near_singular_crosses_fall_back_to_the_svd(smallest: float, device: torch.device) -> None:
    """Below the schedule's floor the iteration does not converge and the SVD answers."""
    values = torch.tensor([[3.0, 2.0, 1.0, smallest]]).expand(4, 4)
    cross = with_singular_values(haar(4, 4, seed=5), values, seed=6).to(device)
    _, converged = polar_by_iteration(cross, POLAR_FLOOR, normalise=True)
    assert converged is not None and not bool(converged.any())
    got = procrustes_rotation(cross)
    assert_rotations(got)
    torch.testing.assert_close(got, nearest_rotation(cross), atol=1e-6, rtol=0)


def test_reflected_crosses_flip_the_smallest_direction(device: torch.device) -> None:
    """A well-conditioned M whose polar factor is a reflection: the iteration converges, the
    determinant check sends it to the SVD path, which flips the smallest direction."""
    values = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).expand(3, 4)
    cross = with_singular_values(reflection(3, 4, seed=7), values, seed=8)
    _, converged = polar_by_iteration(cross, POLAR_QUICK_FLOOR, normalise=True)
    assert converged is not None and bool(converged.all())
    got = procrustes_rotation(cross.to(device)).cpu()
    assert_rotations(got)
    torch.testing.assert_close(got.double(), svd_rotation(cross), atol=1e-5, rtol=0)


@pytest.mark.parametrize("flip", [False, True])
def test_repeated_singular_values_give_an_optimal_proper_rotation(flip: bool) -> None:
    """With repeated singular values the polar factor is still unique (M nonsingular); with a
    reflection and a repeated smallest value the proper optimum is not, so compare objectives."""
    values = torch.tensor([[2.0, 1.0, 1.0, 1.0]]).expand(5, 4)
    left = reflection(5, 4, seed=9) if flip else haar(5, 4, seed=9)
    cross = with_singular_values(left, values, seed=10)
    got = procrustes_rotation(cross)
    assert_rotations(got)
    expected = svd_rotation(cross)
    if not flip:
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    objective = (got.double() * cross.double()).sum((-2, -1))
    best = (expected * cross.double()).sum((-2, -1))
    torch.testing.assert_close(objective, best, atol=1e-5, rtol=1e-6)


def test_zero_and_non_finite_crosses_still_give_rotations() -> None:
    cross = torch.zeros(3, 4, 4)
    cross[1] = torch.eye(4)
    cross[2, 0, 0] = float("nan")
    got = procrustes_rotation(cross[:2])
    assert_rotations(got)
    torch.testing.assert_close(got[1], torch.eye(4))
    _, converged = polar_by_iteration(cross, POLAR_FLOOR, normalise=True)
    assert converged is not None and converged.tolist() == [False, True, False]


def planar_rotation(theta: float, rank: int = 2) -> torch.Tensor:
    """A rotation by ``theta`` in the first coordinate plane of R^rank: ``(1, rank, rank)``."""
    out = torch.eye(rank)
    c, s = math.cos(theta), math.sin(theta)
    out[:2, :2] = torch.tensor([[c, -s], [s, c]])
    return out[None]


@FAST
@given(
    angle=st.floats(math.pi - 1e-3, math.pi),
    lam=st.floats(0.49, 0.51),
    rank=st.integers(2, 5),
)
def test_soft_rotation_near_the_singular_point_is_proper(
    angle: float, lam: float, rank: int
) -> None:
    """lam near 1/2 and an angle near pi make (1 - lam) I + lam R near singular: the checked
    iteration or the SVD fallback still returns a proper rotation, the SVD's where that is
    well defined."""
    rotation = planar_rotation(angle, rank)
    soft = soften_rotation(rotation, lam)
    assert_rotations(soft)
    mixed = torch.lerp(torch.eye(rank), rotation, lam)
    if float(torch.linalg.svdvals(mixed.double()).min()) > 1e-3:
        torch.testing.assert_close(soft.double(), svd_rotation(mixed), atol=1e-5, rtol=0)


@FAST
@given(
    k=st.integers(1, 6),
    rank=st.integers(2, 16),
    lam=st.floats(0.01, 0.99),
    seed=st.integers(0, 99),
)
def test_soft_rotation_matches_the_svd(k: int, rank: int, lam: float, seed: int) -> None:
    rotation = haar(k, rank, seed)
    mixed = torch.lerp(torch.eye(rank), rotation, lam)
    smallest = float(torch.linalg.svdvals(mixed.double()).min())
    soft = soften_rotation(rotation, lam)
    assert_rotations(soft)
    if smallest > 1e-3:  # else the polar factor itself is ill-conditioned
        torch.testing.assert_close(soft.double(), svd_rotation(mixed), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scaled", [False, True])
def test_expanded_statistics_match_the_dense_residuals(scaled: bool) -> None:
    """The streaming aggregator's statistics from M = X_i X_ref^T and two norms only."""
    A, _ = random_factors(3, 4, 8, 6, seed=51)
    A_ref, _ = random_factors(3, 4, 8, 6, seed=52)
    rotation = haar(3, 4, seed=53)
    scale = torch.tensor([0.5, 1.0, 2.0]) if scaled else None
    stats = expanded_gauge_statistics(
        rotation,
        scale,
        cross_gram(A, A_ref),
        torch.linalg.matrix_norm(A).square(),
        torch.linalg.matrix_norm(A_ref).square(),
    )
    s = torch.ones(3) if scale is None else scale
    moved = s[:, None, None] * (rotation.mT @ A)
    torch.testing.assert_close(stats.residual_after, torch.linalg.matrix_norm(moved - A_ref))
    torch.testing.assert_close(stats.residual_before, torch.linalg.matrix_norm(A - A_ref))
    expected = torch.linalg.matrix_norm(s[:, None, None] * rotation.mT - torch.eye(4))
    torch.testing.assert_close(stats.rotation_distance, expected)
