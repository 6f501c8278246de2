"""Rotational alignment of LoRA factors: batched Procrustes, soft rotations, gauge statistics.

Every function works on a stack of ``K`` same-shaped modules at once and runs on the device of
its inputs. The math is done in float32 whatever the input dtype (``torch.linalg.svd`` rejects
fp16/bf16 on CUDA, and r x r problems are small).

Layout. A factor is handled in *row layout*, shape ``(K, r, d)``: ``A`` as it is ``(K, r, d_in)``,
``B`` transposed ``(K, r, d_out)`` (see :func:`as_rows`). In row layout both factors rotate the
same way, ``X <- R^T X``, which is ``A <- R^T A`` and ``B <- B R``; the product ``B A`` is
unchanged for any orthogonal ``R``. The Procrustes cross matrix of the aligned factor is
``M = X_i X_ref^T`` (``A_i A_ref^T`` or ``B_i^T B_ref``), shape ``(K, r, r)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedrot.adapters import Factor

WORK_DTYPE = torch.float32


def as_rows(factor_stack: Tensor, which: Factor) -> Tensor:
    """Row-layout view of a factor stack: ``A (K, r, d_in)`` as is, ``B (K, d_out, r)`` as
    ``(K, r, d_out)``. No copy."""
    return factor_stack if which is Factor.A else factor_stack.mT


def cross_gram(moving: Tensor, reference: Tensor) -> Tensor:
    """``moving @ reference^T`` for row-layout stacks ``(K, r, d)``: ``(K, r, r)`` float32."""
    return torch.bmm(moving.to(WORK_DTYPE), reference.to(WORK_DTYPE).mT)


def _identity(matrix: Tensor) -> Tensor:
    """The ``(r, r)`` identity in the dtype and device of a ``(..., r, r)`` stack."""
    return torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)


def nearest_rotation(matrix: Tensor) -> Tensor:
    """The proper rotation nearest to each ``(r, r)`` matrix of a ``(..., r, r)`` stack, by SVD.

    SVD ``X = U S V^T`` and ``R = U V^T`` (the polar factor); where ``det(R) < 0`` the last row
    of ``V^T`` (the smallest singular direction) is negated and ``R`` recomputed, so every
    result has determinant +1. Exact for any input, singular or not; on the CPU it calls LAPACK
    once per matrix, so :func:`procrustes_rotation` and :func:`soften_rotation` use it only
    where the Newton-Schulz iteration cannot be trusted. Float32 in and out.
    """
    u, _, vh = torch.linalg.svd(matrix.to(WORK_DTYPE))
    vh[..., -1, :] *= torch.linalg.det(torch.matmul(u, vh)).sign()[..., None]  # det is +-1
    return torch.matmul(u, vh)


POLAR_QUICK_FLOOR = 0.1
"""Relative singular value the first, short Newton-Schulz schedule of
:func:`procrustes_rotation` is built for (6 steps): enough for the well-conditioned Procrustes
matrices of most modules."""

POLAR_FLOOR = 1e-3
"""Relative singular value of the second, long schedule (11 steps) that the matrices the first
one did not settle get; a matrix it does not settle either falls back to the SVD."""

POLAR_TOLERANCE = 1e-5
"""An iterate ``Q`` counts as converged when ``||Q^T Q - I||_F <= POLAR_TOLERANCE``."""


@functools.lru_cache(maxsize=64)
def newton_schulz_schedule(lower: float) -> tuple[float, ...]:
    """Scalings ``a_k`` of the scaled Newton-Schulz polar iteration (Chen and Chow, 2014)::

        X <- (a / 2) X (3 I - a^2 X^T X),   a = sqrt(3 / (1 + l + l^2))

    that take every singular value in ``[lower, 1]`` to within 1e-7 of 1; the lower bound
    ``l`` is carried along (``l <- (a / 2) l (3 - a^2 l^2)``). Singular values below ``lower``
    still grow, about 2.6x per step, but may not arrive."""
    alphas: list[float] = []
    low = min(max(lower, 1e-12), 1.0)
    while 1.0 - low > 1e-7 and len(alphas) < 100:
        alpha = math.sqrt(3.0 / (1.0 + low + low * low))
        alphas.append(alpha)
        low = 0.5 * alpha * low * (3.0 - alpha * alpha * low * low)
    return tuple(alphas)


def polar_by_iteration(
    matrix: Tensor, lower: float, *, normalise: bool, check: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Polar factors ``Q = U V^T`` of a ``(K, r, r)`` float32 stack by batched matmuls only.

    With ``normalise`` the stack is first divided by ``||M^T M||_F^(1/2) >= sigma_max``;
    otherwise every singular value must already lie in ``(0, 1]``. ``lower`` is the smallest
    singular value (after the scaling) the schedule is built for. Returns ``Q (K, r, r)`` and,
    with ``check``, a ``(K,)`` bool mask of the matrices that converged
    (``||Q^T Q - I||_F <= POLAR_TOLERANCE``; a zero or non-finite matrix does not), else None.
    No determinant sign fix here.
    """
    x = matrix
    if normalise:
        scale = torch.linalg.matrix_norm(torch.bmm(x.mT, x)).sqrt_()
        x = x / scale[:, None, None]
    for alpha in newton_schulz_schedule(lower):
        x = torch.baddbmm(x, x, torch.bmm(x.mT, x), beta=1.5 * alpha, alpha=-0.5 * alpha**3)
    if not check:
        return x, None
    eye = _identity(x).expand(x.shape)
    error = torch.linalg.matrix_norm(torch.baddbmm(eye, x.mT, x, beta=-1.0))
    return x, error <= POLAR_TOLERANCE


def _where_failed(failed: Tensor) -> Tensor | None:
    """Indices of the True entries of a ``(K,)`` mask, or None when there are none (reads the
    mask on the host: one device synchronisation)."""
    index = failed.nonzero().squeeze(-1)
    return index if index.numel() else None


PROPER_TOLERANCE = 4e-6
"""An iterate ``Q`` of :func:`procrustes_rotation` is accepted when ``det Q >= 1 -
PROPER_TOLERANCE`` (the determinant taken in float64): every singular value is then within
that of 1, so ``||Q^T Q - I||`` is below about twice it."""


def _settled(rotation: Tensor) -> Tensor:
    """``(K,)`` mask of the iterates that are proper rotations: ``det Q >= 1 - tolerance``.

    The scaled Newton-Schulz map sends ``[0, 1]`` into ``[0, 1]``, so every singular value of
    an iterate is at most 1 (up to round-off) and ``|det Q| = prod sigma_i`` reaches 1 only
    when all of them do. One determinant thus tests convergence and the sign at once."""
    return torch.linalg.det(rotation.double()) >= 1.0 - PROPER_TOLERANCE


def procrustes_rotation(cross: Tensor) -> Tensor:
    """Orthogonal Procrustes with det +1: the rotation ``R (..., r, r)`` maximising
    ``trace(R^T M)`` for ``M = X_i X_ref^T (..., r, r)``, so that ``R^T X_i`` is closest to
    ``X_ref``. Float32.

    The polar factor comes from the scaled Newton-Schulz iteration (batched matmuls: on the
    CPU a batched SVD costs one LAPACK call per matrix), first with a short schedule
    (:data:`POLAR_QUICK_FLOOR`), then a long one (:data:`POLAR_FLOOR`) for the matrices the
    first did not settle (see :func:`_settled`). :func:`nearest_rotation` (SVD) solves the
    rest: near-singular matrices (``sigma_min / sigma_max`` below about 1e-3, where the polar
    factor is ill-conditioned anyway), zero or non-finite ones, and those whose polar factor is
    a reflection (``det < 0``: the fix negates the smallest singular direction, which only the
    SVD gives).
    """
    matrix = cross.to(WORK_DTYPE)
    flat = matrix.reshape(-1, *matrix.shape[-2:])
    if flat.shape[0] == 0:
        return matrix.clone()
    rotation, _ = polar_by_iteration(flat, POLAR_QUICK_FLOOR, normalise=True, check=False)
    retry = _where_failed(~_settled(rotation))
    if retry is not None:
        again, _ = polar_by_iteration(flat[retry], POLAR_FLOOR, normalise=True, check=False)
        rotation[retry] = again
        failed = _where_failed(~_settled(again))
        if failed is not None:
            rotation[retry[failed]] = nearest_rotation(flat[retry[failed]])
    return rotation.reshape(matrix.shape)


SOFT_FLOOR = 0.01
"""With ``|1 - 2 lam|`` at least this, :func:`soften_rotation`'s schedule provably converges
and is not checked; below it (``lam`` near 1/2) it is checked and may fall back to the SVD."""


def soften_rotation(rotation: Tensor, lam: float) -> Tensor:
    """Soft alignment: ``polar((1 - lam) I + lam R)`` with det +1, for rotations
    ``R (..., r, r)``.

    ``lam = 0`` gives the identity exactly and ``lam = 1`` returns ``R`` itself; both are
    short-circuited. Otherwise ``X = (1 - lam) I + lam R`` is normal with singular values
    ``|1 - lam + lam e^(i theta)|`` in ``[|1 - 2 lam|, 1]`` over the angles ``theta`` of ``R``,
    so a Newton-Schulz schedule built for that interval converges without scaling or checks.
    Its polar factor has eigenvalues ``e^(i phi)`` with ``phi = atan2(lam sin theta, 1 - lam +
    lam cos theta)``: conjugate pairs and, for each eigenvalue -1 of ``R`` (an even number of
    them in SO(r)), ``sign(1 - 2 lam)``, so its determinant is +1. Near ``lam = 1/2``
    (:data:`SOFT_FLOOR`) ``X`` can be near singular (an angle near pi): there the iteration is
    checked and the SVD with the sign fix solves what it does not settle. Float32.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must lie in [0, 1], got {lam}")
    rotation = rotation.to(WORK_DTYPE)
    if lam == 0.0:
        return _identity(rotation).expand(rotation.shape).clone()
    if lam == 1.0:
        return rotation
    mixed = torch.lerp(_identity(rotation), rotation, lam)
    flat = mixed.reshape(-1, *mixed.shape[-2:])
    if flat.shape[0] == 0:
        return mixed
    lower = abs(1.0 - 2.0 * lam)
    guaranteed = lower >= SOFT_FLOOR
    soft, converged = polar_by_iteration(
        flat, max(lower, POLAR_FLOOR), normalise=False, check=not guaranteed
    )
    failed = None if converged is None else _where_failed(~converged)
    if failed is not None:
        soft[failed] = nearest_rotation(flat[failed])
    return soft.reshape(mixed.shape)


def rotate_rows(rows: Tensor, gauge: Tensor) -> Tensor:
    """``gauge^T @ rows`` for a row-layout stack ``(K, r, d)`` and ``gauge (K, r, r)``."""
    return torch.matmul(gauge.mT, rows.to(WORK_DTYPE))


def rotate_factors(A: Tensor, B: Tensor, rotation: Tensor) -> tuple[Tensor, Tensor]:
    """``A <- R^T A`` and ``B <- B R`` for ``A (K, r, d_in)``, ``B (K, d_out, r)``,
    ``R (K, r, r)``; float32 results, ``B A`` preserved."""
    rotation = rotation.to(WORK_DTYPE)
    return torch.matmul(rotation.mT, A.to(WORK_DTYPE)), torch.matmul(B.to(WORK_DTYPE), rotation)


def sample_haar_rotation(
    count: int, rank: int, generator: torch.Generator, *, dtype: torch.dtype = WORK_DTYPE
) -> Tensor:
    """``count`` rotations drawn uniformly (Haar) from SO(rank): ``(count, rank, rank)``.

    QR of a standard Gaussian matrix with the signs of ``diag(R)`` moved into ``Q`` (Haar on
    O(r)), then the first column negated where ``det(Q) = -1``, a measure-preserving map onto
    SO(r). Sampled in float64 on the generator's device, returned in ``dtype``.
    """
    gaussian = torch.randn(
        count, rank, rank, generator=generator, dtype=torch.float64, device=generator.device
    )
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sgn(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    flip = torch.linalg.det(q) < 0
    q[..., :, 0] *= torch.where(flip, -1.0, 1.0).to(q.dtype)[..., None]
    return q.to(dtype)


@dataclass(frozen=True)
class AlignmentStatistics:
    """Per-module statistics of one client's gauge, each a float32 tensor of shape ``(K,)``.

    ``rotation_distance = ||G - I||_F`` for the ``(r, r)`` gauge ``G = s R`` applied to the
    aligned factor (``||R - I||_F`` for a rotation); ``residual_before = ||X_i - X_ref||_F`` and
    ``residual_after`` the same after the gauge, for the aligned factor ``X``.
    """

    rotation_distance: Tensor
    residual_before: Tensor
    residual_after: Tensor


def gauge_statistics(
    rotation: Tensor,
    scale: Tensor | None,
    diff_cross: Tensor,
    reference_gram: Tensor,
    diff_norm_sq: Tensor,
) -> AlignmentStatistics:
    """Statistics of the gauge ``X_i <- s R^T X_i`` (row layout) from ``(r, r)`` blocks only.

    With ``D = X_i - X_ref``, ``C = D X_ref^T``, ``G_ref = X_ref X_ref^T`` (all ``(K, r, r)``),
    ``L = s R^T`` and ``E = L - I``::

        ||L X_i - X_ref||^2 = tr(E G_ref E^T) + s^2 ||D||^2 + 2 tr(E C^T L^T)
                            = sum(E * (E G_ref + 2 L C)) + s^2 ||D||^2

    Every term is small when ``D`` is, so the residual keeps its precision for nearby factors.
    When the gauge cancels most of ``D`` the float32 blocks limit ``residual_after`` to about
    ``1e-3 * residual_before``; no ``(K, r, d)`` pass is spent on it. ``scale`` is ``(K,)`` or
    None (``s = 1``); ``diff_norm_sq`` is ``||D||_F^2``, ``(K,)``. Float32 results.
    """
    left = rotation.mT.to(WORK_DTYPE)
    moved_sq = diff_norm_sq
    if scale is not None:
        left = left * scale[:, None, None]
        moved_sq = diff_norm_sq * scale.square()
    excess = left - _identity(left)
    inner = torch.baddbmm(torch.bmm(excess, reference_gram), left, diff_cross, alpha=2.0)
    after = (excess * inner).sum((-2, -1)).add_(moved_sq)
    return AlignmentStatistics(
        rotation_distance=torch.linalg.matrix_norm(excess),
        residual_before=diff_norm_sq.clamp_min(0.0).sqrt(),
        residual_after=after.clamp_min_(0.0).sqrt_(),
    )


def expanded_gauge_statistics(
    rotation: Tensor,
    scale: Tensor | None,
    cross: Tensor,
    moving_sq: Tensor,
    reference_sq: Tensor,
) -> AlignmentStatistics:
    """Statistics of the gauge ``X_i <- s R^T X_i`` (row layout) from ``M`` and two norms.

    With ``M = X_i X_ref^T`` ``(K, r, r)``, ``moving_sq = ||X_i||^2`` and ``reference_sq =
    ||X_ref||^2`` (both ``(K,)``)::

        ||X_i - X_ref||^2       = ||X_i||^2 - 2 tr(M) + ||X_ref||^2
        ||s R^T X_i - X_ref||^2 = s^2 ||X_i||^2 - 2 s tr(R^T M) + ||X_ref||^2

    This needs neither ``D = X_i - X_ref`` nor the reference's Gram matrix (what the streaming
    aggregator has at hand), at the price of cancellation: in float32 a residual below about
    1e-3 of ``||X||`` is round-off. ``scale`` is ``(K,)`` or None (``s = 1``). Float32.
    """
    rotation = rotation.to(WORK_DTYPE)
    trace = torch.diagonal(cross, 0, -2, -1).sum(-1)
    aligned_trace = (rotation * cross).sum((-2, -1))
    before = (moving_sq + reference_sq).sub_(trace, alpha=2.0)
    if scale is None:  # ||R^T - I|| = ||R - I||
        excess = rotation - _identity(rotation)
        after = torch.add(before, trace.sub_(aligned_trace), alpha=2.0)
    else:
        left = rotation.mT * scale[:, None, None]
        excess = left - _identity(left)
        after = scale.square() * moving_sq - 2.0 * scale * aligned_trace + reference_sq
    squares = torch.stack(((excess * excess).sum((-2, -1)), before, after), dim=-1)
    distance, before, after = squares.clamp_min_(0.0).sqrt_().unbind(-1)
    return AlignmentStatistics(distance, before, after)


@dataclass(frozen=True)
class Alignment:
    """One client's factors after alignment: ``A (K, r, d_in)``, ``B (K, d_out, r)`` float32,
    the rotation ``R (K, r, r)`` float32 (``A = R^T A_i``, ``B = B_i R``) and its statistics."""

    A: Tensor
    B: Tensor
    rotation: Tensor
    statistics: AlignmentStatistics


def align_to_reference(
    A: Tensor, B: Tensor, A_ref: Tensor, B_ref: Tensor, factor: Factor, lam: float
) -> Alignment:
    """FedRot-LoRA alignment of one client's stacked factors to the round's reference.

    ``A, A_ref: (K, r, d_in)``, ``B, B_ref: (K, d_out, r)``, any float dtype; ``factor`` is the
    factor whose Procrustes problem is solved. Returns float32 factors rotated by
    ``soften_rotation(procrustes_rotation(M), lam)``. ``lam = 0`` returns the inputs (as
    float32) untouched and ``R = I`` exactly.
    """
    moving = as_rows(A if factor is Factor.A else B, factor).to(WORK_DTYPE)
    reference = as_rows(A_ref if factor is Factor.A else B_ref, factor).to(WORK_DTYPE)
    diff = moving - reference
    diff_cross = cross_gram(diff, reference)
    reference_gram = cross_gram(reference, reference)
    cross = diff_cross + reference_gram
    rotation = soften_rotation(procrustes_rotation(cross), lam)
    statistics = gauge_statistics(
        rotation, None, diff_cross, reference_gram, torch.linalg.matrix_norm(diff).square()
    )
    if lam == 0.0:
        return Alignment(A.to(WORK_DTYPE), B.to(WORK_DTYPE), rotation, statistics)
    A_rot, B_rot = rotate_factors(A, B, rotation)
    return Alignment(A_rot, B_rot, rotation, statistics)
