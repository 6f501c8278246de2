"""Round diagnostics: the aggregation error from r x r Gram blocks, rotation statistics, reports.

Aggregation error of a module (ALGORITHM.md section 4)::

    E     = sum_i p_i B_i A_i - B_g A_g                  (absolute: ||E||_F)
    E_ref = sum_i p_i B_i A_i - B_ref A_ref              (relative: ||E||_F / ||E_ref||_F)

Both are sums of rank-r products ``sum_t c_t B_t A_t``, whose squared norm is
``c^T S c`` with ``S_tu = trace((B_t^T B_u)(A_u A_t^T))``: only ``(T r) x (T r)`` Gram matrices,
never a ``d_out x d_in`` one. To avoid cancelling large terms, the products are written around
the factor averages ``B_bar = sum p_i B_i``, ``A_bar = sum p_i A_i`` (exact algebra)::

    sum_i p_i B_i A_i - B_x A_x = sum_i p_i (B_i - B_bar)(A_i - A_bar)
                                  + (B_bar - B_x) A_bar + B_x (A_bar - A_x)

so every term is small when the error is, and a perfect alignment reports an error near zero
instead of the round-off of ``||B A||``.

Three errors per module, and what they are:

- ``aggregation_error``: ``||S - B_g A_g||`` with ``S = sum_i p_i B_i A_i``, the error of the
  round as published (``B_g A_g`` the new global factors);
- ``factor_average_error``: ``||S - B_bar A_bar||`` with the means of the factors *as
  aggregated*, i.e. after any gauge. Under a factor-averaging strategy (FedIT, FedRot, ...)
  ``B_g = B_bar`` up to rounding to the adapter's dtype, so it equals ``aggregation_error``;
  under FlexLoRA and FedEx (no gauge) it is what plain averaging would have left. It is *not*
  FedIT's error of a FedRot round;
- ``fedit_aggregation_error``: ``||S - B~ A~||`` with the means ``B~``, ``A~`` of the factors
  *as uploaded* (before the gauge): the error FedIT averaging would have had for the same
  uploads, so a FedRot round shows the error its rotations removed. Without a gauge it equals
  ``factor_average_error``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedrot.adapters import Factor
from fedrot.drift import ModuleDrift, round_drift_shares

STAT_DTYPE = torch.float64


def product_sum_norms(
    B_rows: Tensor, A_rows: Tensor, coefficients: Tensor, *, precise_tail: int = 0
) -> Tensor:
    """``||sum_t c_t B_t A_t||_F`` for every module and every coefficient vector.

    Row layout: ``B_rows: (K, T * r, d_out)`` stacks ``[B_1^T; ..; B_T^T]`` and
    ``A_rows: (K, T * r, d_in)`` stacks ``[A_1; ..; A_T]``, float32 or float64;
    ``coefficients: (C, T)``. Returns ``(K, C)`` float64. The Gram blocks among the last
    ``precise_tail`` terms (large terms that may cancel each other) are recomputed in float64;
    the rest keep the input dtype. Tiny negative squares from round-off are clamped at 0.
    """
    terms = coefficients.shape[-1]
    rank = B_rows.shape[-2] // terms
    blocks = _gram_blocks(B_rows, A_rows, terms, rank)
    if precise_tail:
        tail = precise_tail * rank
        exact = _gram_blocks(
            B_rows[..., -tail:, :].to(STAT_DTYPE),
            A_rows[..., -tail:, :].to(STAT_DTYPE),
            precise_tail,
            rank,
        )
        blocks[:, -precise_tail:, -precise_tail:] = exact
    coeff = coefficients.to(device=blocks.device, dtype=STAT_DTYPE)
    squares = torch.einsum("ct,ktu,cu->kc", coeff, blocks, coeff)
    return squares.clamp_min(0.0).sqrt()


def _gram_blocks(B_rows: Tensor, A_rows: Tensor, terms: int, rank: int) -> Tensor:
    """``S_tu = trace((B_t^T B_u)(A_u A_t^T))``: ``(K, T, T)`` float64 from the ``(K, T r, T r)``
    Gram matrices (both symmetric, so the trace is an elementwise product summed per block)."""
    gram_b = B_rows @ B_rows.mT
    gram_a = A_rows @ A_rows.mT
    k = gram_b.shape[0]
    return (gram_b * gram_a).to(STAT_DTYPE).view(k, terms, rank, terms, rank).sum((2, 4))


@dataclass(frozen=True)
class ErrorTerms:
    """Everything the error of one group of ``K`` modules needs, in row layout on one device:
    ``A`` stacks ``(K, r, d_in)`` and ``B`` stacks transposed, ``(K, r, d_out)``, float32.

    ``clients_B[k]`` / ``clients_A[k]`` are module ``k``'s clients' factors as aggregated
    (after any gauge), one ``(r, d)`` row-layout tensor per client; ``weights`` the normalised
    ``p_i``; ``mean_*`` the factor averages; ``global_*`` the new global factors; ``ref_*`` the
    round's reference, or None; ``unaligned_*`` the averages of the factors as uploaded (before
    a gauge), None when no gauge moved them.
    """

    clients_B: Sequence[Sequence[Tensor]]
    clients_A: Sequence[Sequence[Tensor]]
    weights: Sequence[float]
    mean_B: Tensor
    mean_A: Tensor
    global_B: Tensor
    global_A: Tensor
    ref_B: Tensor | None
    ref_A: Tensor | None
    unaligned_B: Tensor | None = None
    unaligned_A: Tensor | None = None


@dataclass(frozen=True)
class GroupErrors:
    """Per-module norms of one group, float64 ``(K,)`` each; ``reference`` is None without a
    reference. ``factor_average`` is ``||sum p_i B_i A_i - B_bar A_bar||_F`` (means of the
    factors as aggregated), ``fedit`` the same with the means of the factors as uploaded."""

    aggregation: Tensor
    reference: Tensor | None
    factor_average: Tensor
    fedit: Tensor


ERROR_CHUNK_BYTES = 64 * 2**20
"""Modules are processed in slices whose stacked error terms stay under this size (one group
can hold every module of a shape, so this, not the group, bounds the transient memory)."""


def group_errors(terms: ErrorTerms) -> GroupErrors:
    """Absolute, reference, factor-average and FedIT error norms of one group from Gram blocks.

    Stacks ``[B_i - B_bar .., B_bar - B_g, B_g, B_bar - B_ref, B_ref, B_bar - B~, B~]`` with
    the matching ``[A_i - A_bar .., A_bar, A_bar - A_g, A_bar, A_bar - A_ref, A_bar,
    A_bar - A~]`` (the last two only with unaligned means ``B~``, ``A~``) and evaluates a
    coefficient vector per norm on them, a slice of modules at a time (see
    ``ERROR_CHUNK_BYTES``). Without unaligned means the FedIT norm is the factor-average one.
    """
    has_ref = terms.ref_B is not None and terms.ref_A is not None
    unaligned = terms.unaligned_B is not None and terms.unaligned_A is not None
    p = [float(w) for w in terms.weights]
    tails = [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0] * 4]
    if unaligned:
        tails = [t + [0.0, 0.0] for t in tails] + [[0.0] * 4 + [1.0, 1.0]]
    coefficients = torch.tensor([p + t for t in tails], dtype=STAT_DTYPE)
    tail = len(tails[0])
    k, rank, width = terms.mean_A.shape
    per_module = (len(p) + tail) * rank * (width + terms.mean_B.shape[-1]) * 4
    step = max(1, ERROR_CHUNK_BYTES // per_module)
    norms = [
        product_sum_norms(
            *_stacked_terms(terms, slice(i, i + step)), coefficients, precise_tail=tail
        )
        for i in range(0, k, step)
    ]
    out = torch.cat(norms)
    return GroupErrors(
        aggregation=out[:, 0],
        reference=out[:, 1] if has_ref else None,
        factor_average=out[:, 2],
        fedit=out[:, 3] if unaligned else out[:, 2],
    )


def _stacked_terms(terms: ErrorTerms, part: slice) -> tuple[Tensor, Tensor]:
    """The ``(k, (N + 4 or 6) r, d)`` row stacks of B and A terms for the modules in ``part``."""
    mean_B, mean_A = terms.mean_B[part], terms.mean_A[part]
    glob_B, glob_A = terms.global_B[part], terms.global_A[part]
    ref_B = terms.ref_B[part] if terms.ref_B is not None else torch.zeros_like(mean_B)
    ref_A = terms.ref_A[part] if terms.ref_A is not None else torch.zeros_like(mean_A)
    B_tail: tuple[Tensor, ...] = (mean_B - glob_B, glob_B, mean_B - ref_B, ref_B)
    A_tail: tuple[Tensor, ...] = (mean_A, mean_A - glob_A, mean_A, mean_A - ref_A)
    if terms.unaligned_B is not None and terms.unaligned_A is not None:
        plain_B, plain_A = terms.unaligned_B[part], terms.unaligned_A[part]
        B_tail += (mean_B - plain_B, plain_B)
        A_tail += (mean_A, mean_A - plain_A)
    return _module_rows(terms.clients_B[part], mean_B, B_tail), _module_rows(
        terms.clients_A[part], mean_A, A_tail
    )


def _module_rows(
    clients: Sequence[Sequence[Tensor]], mean: Tensor, tail: tuple[Tensor, ...]
) -> Tensor:
    """Per module ``k``: ``[X_1 - X_bar; ..; X_N - X_bar; tail...]``, stacked over modules
    into one ``(k, (N + len(tail)) r, d)`` tensor written in place (no other copy)."""
    k, rank, width = mean.shape
    terms = len(clients[0]) + len(tail) if clients else len(tail)
    out = torch.empty(k, terms * rank, width, dtype=mean.dtype, device=mean.device)
    blocks = out.view(k, terms, rank, width)
    n = terms - len(tail)
    for m, per_client in enumerate(clients):
        if n:
            torch.stack(list(per_client), out=blocks[m, :n]).sub_(mean[m])
    for j, t in enumerate(tail, start=n):
        blocks[:, j].copy_(t)
    return out


def global_norm(values: Sequence[float | None]) -> float | None:
    """``sqrt(sum v^2)`` over modules, or None when any value is missing."""
    if any(v is None for v in values):
        return None
    return math.sqrt(sum(v * v for v in values))  # type: ignore[operator]


def relative(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0.0:
        return None
    return numerator / denominator


@dataclass(frozen=True, slots=True)
class RotationStats:
    """One module's gauge for one client: ``||G - I||_F`` (``G = s R``, ``||R - I||_F`` for a
    rotation) and ``||X_i - X_ref||_F`` before and after it, for the aligned factor ``X``."""

    module: str
    rotation_distance: float
    residual_before: float
    residual_after: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "rotation_distance": self.rotation_distance,
            "residual_before": self.residual_before,
            "residual_after": self.residual_after,
        }


@dataclass(frozen=True, slots=True)
class ClientReport:
    """What one ``add`` did: the client's raw weight and its per-module rotation statistics
    (empty when the round does not align)."""

    client_id: str
    weight: float
    rotations: tuple[RotationStats, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "weight": self.weight,
            "rotations": [r.to_dict() for r in self.rotations],
        }


@dataclass(frozen=True)
class ModuleError:
    """One module's errors (None when not tracked; relative also None without a reference
    or with a zero update); see the module docstring for what each one is."""

    module: str
    aggregation_error: float | None
    relative_aggregation_error: float | None
    factor_average_error: float | None
    update_norm: float | None = None
    fedit_aggregation_error: float | None = None
    fedit_relative_aggregation_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "aggregation_error": self.aggregation_error,
            "relative_aggregation_error": self.relative_aggregation_error,
            "factor_average_error": self.factor_average_error,
            "fedit_aggregation_error": self.fedit_aggregation_error,
            "fedit_relative_aggregation_error": self.fedit_relative_aggregation_error,
            "update_norm": self.update_norm,
        }


@dataclass(frozen=True)
class AggregationReport:
    """The diagnostics of one aggregated round; ``to_dict()`` is plain JSON-able data.

    ``aggregation_error`` is the square root of the sum over modules of the squared module
    errors; ``relative_aggregation_error`` divides it by the same global norm of the update
    ``sum p_i B_i A_i - B_ref A_ref``. ``update_norm`` in a module entry is that
    denominator. All errors are None when the round ran with ``track_error=False``.
    ``fedit_*`` are the same norms for FedIT's averages of the same uploads, and
    ``error_removed_share = 1 - aggregation_error / fedit_aggregation_error`` the share of
    FedIT's error the round's gauge removed (0 without a gauge, negative when it added error).

    ``drift`` has one :class:`~fedrot.drift.ModuleDrift` per module in a round that aligns
    (empty otherwise, errors tracked or not); ``rotation_drift_share`` is the drift-weighted
    share over modules that the optimal rotations remove, ``applied_rotation_drift_share`` the
    same for the gauge actually applied.
    """

    round_index: int
    strategy: str
    aligned: Factor | None
    lam: float | None
    num_clients: int
    total_weight: float
    modules: tuple[ModuleError, ...]
    aggregation_error: float | None
    relative_aggregation_error: float | None
    factor_average_error: float | None
    clients: tuple[ClientReport, ...]
    fedit_aggregation_error: float | None = None
    fedit_relative_aggregation_error: float | None = None
    drift: tuple[ModuleDrift, ...] = ()

    @property
    def error_removed_share(self) -> float | None:
        """``1 - aggregation_error / fedit_aggregation_error`` (None when either is missing or
        FedIT's error is 0)."""
        ratio = relative(self.aggregation_error, self.fedit_aggregation_error)
        return None if ratio is None else 1.0 - ratio

    @property
    def rotation_drift_share(self) -> float | None:
        return round_drift_shares(self.drift)[0]

    @property
    def applied_rotation_drift_share(self) -> float | None:
        return round_drift_shares(self.drift)[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "round_index": self.round_index,
            "strategy": str(self.strategy),
            "aligned": None if self.aligned is None else str(self.aligned),
            "lambda": self.lam,
            "num_clients": self.num_clients,
            "total_weight": self.total_weight,
            "aggregation_error": self.aggregation_error,
            "relative_aggregation_error": self.relative_aggregation_error,
            "factor_average_error": self.factor_average_error,
            "fedit_aggregation_error": self.fedit_aggregation_error,
            "fedit_relative_aggregation_error": self.fedit_relative_aggregation_error,
            "error_removed_share": self.error_removed_share,
            "rotation_drift_share": self.rotation_drift_share,
            "applied_rotation_drift_share": self.applied_rotation_drift_share,
            "rotation_drift": [d.to_dict() for d in self.drift],
            "modules": [m.to_dict() for m in self.modules],
            "clients": [c.to_dict() for c in self.clients],
        }


def module_errors(
    modules: Sequence[str],
    aggregation: Sequence[float],
    reference: Sequence[float] | None,
    factor_average: Sequence[float],
    fedit: Sequence[float] | None = None,
) -> tuple[ModuleError, ...]:
    """Per-module ``ModuleError`` records from the norms of one or more groups (``fedit``
    None: the factor-average norms)."""
    plain = factor_average if fedit is None else fedit
    out = []
    for i, module in enumerate(modules):
        denominator = None if reference is None else reference[i]
        out.append(
            ModuleError(
                module=module,
                aggregation_error=aggregation[i],
                relative_aggregation_error=relative(aggregation[i], denominator),
                factor_average_error=factor_average[i],
                update_norm=denominator,
                fedit_aggregation_error=plain[i],
                fedit_relative_aggregation_error=relative(plain[i], denominator),
            )
        )
    return tuple(out)
