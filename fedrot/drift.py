"""The rotation drift diagnostic: how much of the clients' drift a rotation explains, from r x r
blocks only (the paper's Figure 5, the share that rises from about 1 % to 40 % mid-training).

Per module, for the round's aligned factor ``X`` in row layout (``A (r, d_in)`` or ``B^T
(r, d_out)``, see :mod:`fedrot.alignment`), with ``M_i = X_i X_ref^T (r, r)`` and ``p_i`` the
normalised weights::

    D_before = sum_i p_i ||X_i - X_ref||_F^2
    D_after  = sum_i p_i ||R_i^T X_i - X_ref||_F^2,        R_i in SO(r)

Both come from the three numbers the Procrustes step already has:

    ||X_i - X_ref||^2       = ||X_i||^2 - 2 tr(M_i) + ||X_ref||^2
    ||R^T X_i - X_ref||^2   = ||X_i||^2 - 2 tr(R^T M_i) + ||X_ref||^2

so a rotation removes ``2 tr((R - I)^T M_i)`` of client i's drift (no cancellation of the
large norms). For the optimal rotation (hard alignment, ``lambda = 1``), with the SVD
``M = U S V^T`` and ``Z = V^T R^T U`` (orthogonal, ``det Z = det(U V^T)`` for ``R`` in SO(r)),
``tr(R^T M) = tr(S Z)`` is at most the *signed nuclear norm*::

    max_{R in SO(r)} tr(R^T M) = sum_j sigma_j                   if det M >= 0
                               = sum_j sigma_j - 2 sigma_min     if det M <  0

(von Neumann's trace inequality; with ``det Z = -1`` forced, the best ``Z`` flips the smallest
direction: Umeyama, 1991). That is the optimum of the det +1 Procrustes problem the project
solves, so ``D_after`` of the optimal rotation is ``||X_i||^2 + ||X_ref||^2 - 2 ||M_i||_*'``.
:func:`signed_nuclear_norm` evaluates it by SVD; the aggregator takes ``tr(R*^T M)`` from the
Procrustes rotation ``R*`` it solved anyway (re-orthonormalised in float64 by
:func:`orthonormalised`: at the optimum a small error in ``R``'s direction moves the trace only
to second order). The *share* is ``(D_before - D_after) / D_before`` (0 when ``D_before = 0``).

The same removal for the gauge actually applied (soft alignment, ``lambda < 1``, or the
ablations' ``s R^T``): ``(1 - s^2) ||X_i||^2 + 2 (s tr(R^T M_i) - tr(M_i))``.

Precision: ``D_before`` expands norms computed in float32, so it carries a round-off of about
``1e-7 (||X_i||^2 + ||X_ref||^2)``; the removed parts do not (they are products of ``R - I``
with ``M``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DRIFT_DTYPE = torch.float64


def signed_nuclear_norm(cross: Tensor) -> Tensor:
    """``max_{R in SO(r)} tr(R^T M)`` for a ``(..., r, r)`` stack: the sum of the singular
    values, less twice the smallest where ``det M < 0``. Float64 ``(...)``, by SVD (the
    reference formula; one LAPACK call per matrix on the CPU)."""
    matrix = cross.to(DRIFT_DTYPE)
    sigma = torch.linalg.svdvals(matrix)
    flip = torch.linalg.det(matrix) < 0
    return sigma.sum(-1) - 2.0 * sigma[..., -1] * flip.to(DRIFT_DTYPE)


def orthonormalised(rotation: Tensor, steps: int = 1) -> Tensor:
    """A float32 near-rotation ``(..., r, r)`` made orthogonal to float64 precision by Newton's
    polar iteration ``R <- R (3 I - R^T R) / 2``: quadratic, so one step takes the project's
    rotations (orthogonal to about 4e-6 at worst, see :func:`fedrot.alignment.procrustes_rotation`)
    to about 1e-11. Float64."""
    r = rotation.to(DRIFT_DTYPE)
    eye = torch.eye(r.shape[-1], dtype=DRIFT_DTYPE, device=r.device)
    for _ in range(steps):
        r = 0.5 * torch.matmul(r, 3.0 * eye - torch.matmul(r.mT, r))
    return r


def drift_before(cross: Tensor, moving_sq: Tensor, reference_sq: Tensor) -> Tensor:
    """``||X_i - X_ref||^2 = ||X_i||^2 - 2 tr(M) + ||X_ref||^2`` for ``M (K, r, r)`` and the
    squared norms ``(K,)``: float64 ``(K,)``, clamped at 0."""
    trace = torch.diagonal(cross, 0, -2, -1).sum(-1).to(DRIFT_DTYPE)
    before = moving_sq.to(DRIFT_DTYPE) + reference_sq.to(DRIFT_DTYPE) - 2.0 * trace
    return before.clamp_min(0.0)


def drift_removed(
    cross: Tensor, rotation: Tensor, scale: Tensor | None = None, moving_sq: Tensor | None = None
) -> Tensor:
    """``||X_i - X_ref||^2 - ||s R^T X_i - X_ref||^2`` for ``M = X_i X_ref^T (K, r, r)`` and
    ``R (K, r, r)`` (taken as is: pass :func:`orthonormalised` rotations): ``2 tr((R - I)^T M)``
    without a scale, ``(1 - s^2) ||X_i||^2 + 2 (s tr(R^T M) - tr M)`` with ``scale (K,)``
    (then ``moving_sq = ||X_i||^2`` is needed). Float64 ``(K,)``; negative when the gauge moves
    ``X_i`` away from the reference."""
    matrix = cross.to(DRIFT_DTYPE)
    r = rotation.to(DRIFT_DTYPE)
    eye = torch.eye(r.shape[-1], dtype=DRIFT_DTYPE, device=r.device)
    if scale is None:
        return 2.0 * ((r - eye) * matrix).sum((-2, -1))
    if moving_sq is None:
        raise ValueError("a scaled gauge needs moving_sq = ||X_i||^2")
    s = scale.to(DRIFT_DTYPE)
    trace = torch.diagonal(matrix, 0, -2, -1).sum(-1)
    aligned = (r * matrix).sum((-2, -1))
    return (1.0 - s * s) * moving_sq.to(DRIFT_DTYPE) + 2.0 * (s * aligned - trace)


def client_drift(
    cross: Tensor,
    moving_sq: Tensor,
    reference_sq: Tensor,
    optimal: Tensor,
    applied: Tensor,
    scale: Tensor | None = None,
) -> Tensor:
    """One client's ``(3, K)`` float64 drift terms for a group of ``K`` modules: the drift
    :func:`drift_before`, what the ``optimal`` rotations remove and what the ``applied`` gauge
    ``(R, s)`` removes (:func:`drift_removed`), both capped at the drift (``D_after >= 0``;
    the cap only trims round-off). ``cross``, ``optimal`` and ``applied`` are ``(K, r, r)``
    float32; the two rotations are re-orthonormalised in one batch."""
    k = cross.shape[0]
    same = applied is optimal
    rotations = orthonormalised(optimal if same else torch.cat((optimal, applied)))
    before = drift_before(cross, moving_sq, reference_sq)
    removed = drift_removed(cross, rotations[:k])
    moved = removed if same else drift_removed(cross, rotations[k:], scale, moving_sq)
    return torch.stack((before, removed.minimum(before), moved.minimum(before)))


def drift_share(removed: float, before: float) -> float:
    """``removed / before``, 0 when ``before`` is 0."""
    return removed / before if before > 0.0 else 0.0


class DriftSums:
    """Weighted sums over clients of one group's per-module drift: ``before``, ``removed`` by
    the optimal rotation and ``applied_removed`` by the gauge actually applied, each
    ``sum_i w_i (.)_i``, float64 ``(K,)`` on the device of the first terms."""

    def __init__(self) -> None:
        self._sums: Tensor | None = None

    def add(self, weight: float, terms: Tensor) -> None:
        """Add one client's ``(3, K)`` float64 terms (:func:`client_drift`) with raw weight
        ``weight``."""
        if self._sums is None:
            self._sums = terms * weight
        else:
            self._sums.add_(terms, alpha=weight)

    def means(self, total: float) -> tuple[list[float], list[float], list[float]] | None:
        """``(before, removed, applied_removed)`` per module divided by ``total = sum w_i``
        (``p_i``-weighted), or None when nothing was added."""
        if self._sums is None:
            return None
        before, removed, applied = (self._sums / total).cpu().tolist()
        return before, removed, applied


@dataclass(frozen=True)
class ModuleDrift:
    """One module's drift in a round that aligns: ``drift = sum_i p_i ||X_i - X_ref||^2`` of
    the aligned factor, ``removed`` the part of it the optimal (hard, det +1) rotations remove
    and ``applied_removed`` the part the gauge actually applied removes (soft alignment for
    ``lambda < 1``)."""

    module: str
    drift: float
    removed: float
    applied_removed: float

    @property
    def share(self) -> float:
        """``rotation_drift_share``: ``removed / drift`` (0 without drift)."""
        return drift_share(self.removed, self.drift)

    @property
    def applied_share(self) -> float:
        """``applied_rotation_drift_share``: ``applied_removed / drift``."""
        return drift_share(self.applied_removed, self.drift)

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "drift": self.drift,
            "removed": self.removed,
            "rotation_drift_share": self.share,
            "applied_removed": self.applied_removed,
            "applied_rotation_drift_share": self.applied_share,
        }


def round_drift_shares(drifts: Sequence[ModuleDrift]) -> tuple[float | None, float | None]:
    """The drift-weighted shares over modules, ``sum removed / sum drift`` for the optimal and
    for the applied rotations; ``(None, None)`` when no module was aligned."""
    if not drifts:
        return None, None
    before = sum(d.drift for d in drifts)
    return (
        drift_share(sum(d.removed for d in drifts), before),
        drift_share(sum(d.applied_removed for d in drifts), before),
    )
