"""The aggregation error norms of one module from a dense ``Q`` (or a strip of its rows).

The three norms of a module (see :mod:`fedrot.diagnostics`) all derive from
``S = sum_i p_i B_i A_i`` over the clients' factors as aggregated. Written around the round's
reference (exact algebra, with ``dB_i = B_i - B_ref``, ``dA_i = A_i - A_ref`` and the means
``B_bar``, ``A_bar``, ``dB_bar = B_bar - B_ref``, ``dA_bar = A_bar - A_ref``)::

    S - B_bar A_bar = Q / W - dB_bar dA_bar,              Q = sum_i w_i dB_i dA_i
    S - B_g A_g     = (S - B_bar A_bar) + (B_bar - B_g) A_bar + B_g (A_bar - A_g)
    S - B_ref A_ref = (S - B_g A_g) + (B_g - B_ref) A_g + B_ref (A_g - A_ref)
    S - B_y A_y     = (S - B_x A_x) + (B_x - B_y) A_x + B_y (A_x - A_y)     (any two pairs)

so one dense ``d_out x d_in`` matrix ``Q`` per module carries everything that depends on the
pairs of clients; the rest are rank-r products. ``Q`` only holds second-order terms (small when
the clients stay near the reference), so nothing large cancels when the error is tiny.

FedIT's error for the same uploads. A gauge leaves every ``B_i A_i``, hence ``S``, unchanged;
only the averages differ. With the means of the factors *as uploaded* (before the gauge)
``B~``, ``A~``, the last line above takes ``S - B_g A_g`` to ``S - B~ A~``, the error plain
FedIT averaging would have had: one more GEMM of inner size ``2 r`` on the dense path, two more
terms on the Gram path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedrot.adapters import Factor
from fedrot.diagnostics import STAT_DTYPE


@dataclass(frozen=True)
class ModuleFactors:
    """The rank-r factors of one module in their own layout (``B (d_out, r)``, ``A (r, d_in)``),
    float32 or float64: the round's reference, the clients' weighted means and the new global
    factors; ``unaligned_*`` the weighted means of the factors as uploaded (before a gauge),
    None when no gauge moved them (then the means)."""

    ref_B: Tensor
    ref_A: Tensor
    mean_B: Tensor
    mean_A: Tensor
    global_B: Tensor
    global_A: Tensor
    unaligned_B: Tensor | None = None
    unaligned_A: Tensor | None = None

    def rows(self, part: slice) -> ModuleFactors:
        """The same factors for the rows ``part`` of ``d_out`` (every ``B`` sliced): what a
        strip of ``Q``'s rows needs, since every correction term is ``B``-side times ``A``."""
        return ModuleFactors(
            ref_B=self.ref_B[part],
            ref_A=self.ref_A,
            mean_B=self.mean_B[part],
            mean_A=self.mean_A,
            global_B=self.global_B[part],
            global_A=self.global_A,
            unaligned_B=None if self.unaligned_B is None else self.unaligned_B[part],
            unaligned_A=self.unaligned_A,
        )


def to_factor_average_error(products: Tensor, total: float, f: ModuleFactors) -> None:
    """``Q <- Q / W - dB_bar dA_bar = S - B_bar A_bar``, in place (one pass over ``Q``)."""
    dB, dA = f.mean_B - f.ref_B, f.mean_A - f.ref_A
    products.addmm_(_as(dB, products), _as(dA, products), beta=1.0 / total, alpha=-1.0)


def to_global_error(error: Tensor, f: ModuleFactors) -> None:
    """``E <- E + (B_bar - B_g) A_bar + B_g (A_bar - A_g)``: from ``S - B_bar A_bar`` to
    ``S - B_g A_g`` in one GEMM of inner size ``2 r``."""
    left = torch.cat((f.mean_B - f.global_B, f.global_B), dim=1)
    right = torch.cat((f.mean_A, f.mean_A - f.global_A), dim=0)
    error.addmm_(_as(left, error), _as(right, error))


def to_reference_error(error: Tensor, f: ModuleFactors) -> None:
    """``E <- E + (B_g - B_ref) A_g + B_ref (A_g - A_ref)``: from ``S - B_g A_g`` to
    ``S - B_ref A_ref``."""
    to_other_product(error, (f.global_B, f.global_A), (f.ref_B, f.ref_A))


def to_other_product(
    error: Tensor, source: tuple[Tensor, Tensor], target: tuple[Tensor, Tensor]
) -> None:
    """``E <- E + (B_x - B_y) A_x + B_y (A_x - A_y)``: from ``S - B_x A_x`` to ``S - B_y A_y``
    for ``source = (B_x, A_x)``, ``target = (B_y, A_y)``, one GEMM of inner size ``2 r``."""
    (B_x, A_x), (B_y, A_y) = source, target
    left = torch.cat((B_x - B_y, B_y), dim=1)
    right = torch.cat((A_x, A_x - A_y), dim=0)
    error.addmm_(_as(left, error), _as(right, error))


def frobenius(matrix: Tensor) -> float:
    return float(torch.linalg.vector_norm(matrix, dtype=STAT_DTYPE))


def dense_error_norms(
    products: Tensor, total: float, f: ModuleFactors
) -> tuple[float, float, float, float]:
    """``(||S - B_g A_g||, ||S - B_ref A_ref||, ||S - B_bar A_bar||, ||S - B~ A~||)`` of one
    module from ``products = Q = sum_i w_i dB_i dA_i`` ``(d_out, d_in)`` (float32 or float64,
    overwritten: no temporary of its size) and ``total = W``; ``B~ A~`` is the product of the
    unaligned means (FedIT's error), the third norm again without them."""
    squares = dense_error_squares(products, total, f)
    return tuple(math.sqrt(s) for s in squares)  # type: ignore[return-value]


def dense_error_squares(
    products: Tensor, total: float, f: ModuleFactors
) -> tuple[float, float, float, float]:
    """The squares of :func:`dense_error_norms`; ``products`` may be a strip of ``Q``'s rows
    with ``f`` sliced to match (:meth:`ModuleFactors.rows`): the squares of strips add up."""
    to_factor_average_error(products, total, f)
    average = squared(products)
    to_global_error(products, f)
    aggregation = squared(products)
    fedit, last = average, (f.global_B, f.global_A)
    if f.unaligned_B is not None and f.unaligned_A is not None:
        last = (f.unaligned_B, f.unaligned_A)
        to_other_product(products, (f.global_B, f.global_A), last)
        fedit = squared(products)
    to_other_product(products, last, (f.ref_B, f.ref_A))
    return aggregation, squared(products), average, fedit


def squared(matrix: Tensor) -> float:
    return frobenius(matrix) ** 2


def _as(x: Tensor, like: Tensor) -> Tensor:
    return x.to(dtype=like.dtype, device=like.device)


def module_factors(
    reference: Mapping[Factor, Tensor],
    means: Mapping[Factor, Tensor],
    glob: Mapping[Factor, Tensor],
    k: int,
    unaligned: Mapping[Factor, Tensor] | None = None,
) -> ModuleFactors:
    """Module ``k``'s :class:`ModuleFactors` from row-layout stacks."""
    return ModuleFactors(
        ref_B=reference[Factor.B][k].mT,
        ref_A=reference[Factor.A][k],
        mean_B=means[Factor.B][k].mT,
        mean_A=means[Factor.A][k],
        global_B=glob[Factor.B][k].mT,
        global_A=glob[Factor.A][k],
        unaligned_B=None if unaligned is None else unaligned[Factor.B][k].mT,
        unaligned_A=None if unaligned is None else unaligned[Factor.A][k],
    )
