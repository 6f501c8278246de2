"""The exact aggregation error of a round with memory bounded in the number of clients.

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

:class:`GroupErrorTracker` is a hybrid per module group. While the clients' stored factors take
less memory than ``Q`` would (``n r (d_in + d_out) < d_out d_in`` per module, times
:data:`GRAM_BUDGET`), it keeps them and ``finalize`` uses the Gram-block path of
:func:`fedrot.diagnostics.group_errors` (exact; cheap for few clients). When they reach that
size it folds them into ``Q`` (one GEMM per module over all stored clients, freeing each
module's factors as it goes), and from then on buffers arriving clients up to
:data:`FOLD_BUDGET` of ``Q``'s size before folding them in one GEMM per module: memory stays
below ``(1 + FOLD_BUDGET)`` times ``Q`` plus one module's working set, and the time is linear in
the number of clients (the batched fold runs the GEMM at its compute rate, where one rank-r
update per client would be bound by reading and writing ``Q``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedrot.adapters import Factor
from fedrot.diagnostics import STAT_DTYPE, ErrorTerms, GroupErrors, group_errors
from fedrot.module_groups import ModuleGroup, rows_shape
from fedrot.weighted_sums import SUM_DTYPE, TermAccumulator, mean_of

GRAM_BUDGET = 1.0
"""Stored client factors may grow to this fraction of ``Q``'s size before the first fold."""

FOLD_BUDGET = 0.125
"""After the first fold, arriving clients are buffered up to this fraction of ``Q``'s size."""

DENSE_DTYPE = torch.float32
"""``Q``'s dtype. Float32 suffices: ``Q`` holds only second-order terms, so its round-off is
relative to ``||sum p_i dB_i dA_i||``, far below the first-order size of the update (the
relative error's denominator); docs/benchmarks.md gives the measured difference to float64."""


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
    to_factor_average_error(products, total, f)
    average = frobenius(products)
    to_global_error(products, f)
    aggregation = frobenius(products)
    fedit, last = average, (f.global_B, f.global_A)
    if f.unaligned_B is not None and f.unaligned_A is not None:
        last = (f.unaligned_B, f.unaligned_A)
        to_other_product(products, (f.global_B, f.global_A), last)
        fedit = frobenius(products)
    to_other_product(products, last, (f.ref_B, f.ref_A))
    return aggregation, frobenius(products), average, fedit


def _as(x: Tensor, like: Tensor) -> Tensor:
    return x.to(dtype=like.dtype, device=like.device)


class GroupErrorTracker:
    """The aggregation error of one module group, fed one client at a time.

    ``reference`` holds the round's reference factors as row-layout float32 stacks
    (``A (K, r, d_in)``, ``B^T (K, r, d_out)``). ``products=False`` (a round that freezes a
    factor: then every ``dB_i dA_i`` is zero) keeps nothing per client.
    """

    def __init__(
        self, group: ModuleGroup, reference: Mapping[Factor, Tensor], *, products: bool = True
    ) -> None:
        self.group = group
        self._reference = reference
        self._products = products
        self._rows: dict[Factor, list[list[Tensor]]] = {f: self._per_module() for f in Factor}
        self._weights: list[float] = []
        self._dense: list[Tensor] = []
        item = torch.empty(0, dtype=DENSE_DTYPE).element_size()
        k = len(group.modules)
        self._dense_bytes = k * group.d_out * group.d_in * item
        self._client_bytes = k * group.rank * (group.d_in + group.d_out) * 4

    def _per_module(self) -> list[list[Tensor]]:
        return [[] for _ in self.group.modules]

    @property
    def folded(self) -> bool:
        """True once stored clients went into the dense ``Q`` (``finalize`` is then dense)."""
        return bool(self._dense)

    def held_bytes(self) -> int:
        """Bytes of client factors and dense products held now."""
        held = [t for per_module in self._rows.values() for rows in per_module for t in rows]
        return sum(t.numel() * t.element_size() for t in held + self._dense)

    def add(self, weight: float, rows: Mapping[Factor, Sequence[Tensor]]) -> None:
        """Keep one client's factors as aggregated: ``rows[f][k]`` is module ``k``'s ``(r, d)``
        row-layout float32 factor, kept as given (pass tensors that nothing else uses)."""
        if not self._products:
            return
        for f in Factor:
            for stored, row in zip(self._rows[f], rows[f], strict=True):
                stored.append(row)
        self._weights.append(weight)
        budget = FOLD_BUDGET if self.folded else GRAM_BUDGET
        if len(self._weights) * self._client_bytes >= budget * self._dense_bytes:
            self._fold()

    def _fold(self) -> None:
        """Add ``sum_i w_i dB_i dA_i`` of the buffered clients into ``Q``: one GEMM of inner
        size ``n r`` per module, each module's factors released once folded."""
        device = self._reference[Factor.A].device
        weights = torch.tensor(self._weights, dtype=DENSE_DTYPE, device=device)[:, None, None]
        first = not self._dense
        for k in range(len(self.group.modules)):
            left = self._centred(Factor.B, k).mul_(weights).flatten(0, 1).mT
            right = self._centred(Factor.A, k).flatten(0, 1)
            if first:
                self._dense.append(torch.mm(left, right))
            else:
                self._dense[k].addmm_(left, right)
        self._weights = []

    def _centred(self, which: Factor, k: int) -> Tensor:
        """Module ``k``'s buffered ``which`` rows minus the reference's, ``(n, r, d)`` in
        ``DENSE_DTYPE``; the buffered tensors are released."""
        stored, self._rows[which][k] = self._rows[which][k], []
        rows = torch.stack(stored).to(DENSE_DTYPE)
        stored.clear()
        return rows.sub_(self._reference[which][k])

    def finalize(
        self,
        total: float,
        means: Mapping[Factor, Tensor],
        glob: Mapping[Factor, Tensor],
        *,
        has_reference: bool,
        unaligned: Mapping[Factor, Tensor] | None = None,
    ) -> GroupErrors:
        """The group's norms. ``total`` is ``W = sum w_i`` over every client; ``means`` (the
        weighted means), ``glob`` (the new global factors) and ``unaligned`` (the means of the
        factors as uploaded, None when no gauge moved them) are row-layout float32 stacks like
        the reference. The Gram path unless clients were folded, else the dense one."""
        if self.folded:
            if self._weights:
                self._fold()
            return self._dense_errors(total, means, glob, has_reference, unaligned)
        ref = self._reference
        return group_errors(
            ErrorTerms(
                clients_B=self._rows[Factor.B],
                clients_A=self._rows[Factor.A],
                weights=[w / total for w in self._weights],
                mean_B=means[Factor.B],
                mean_A=means[Factor.A],
                global_B=glob[Factor.B],
                global_A=glob[Factor.A],
                ref_B=ref[Factor.B] if has_reference else None,
                ref_A=ref[Factor.A] if has_reference else None,
                unaligned_B=None if unaligned is None else unaligned[Factor.B],
                unaligned_A=None if unaligned is None else unaligned[Factor.A],
            )
        )

    def _dense_errors(
        self,
        total: float,
        means: Mapping[Factor, Tensor],
        glob: Mapping[Factor, Tensor],
        has_reference: bool,
        unaligned: Mapping[Factor, Tensor] | None,
    ) -> GroupErrors:
        norms = []
        for k in range(len(self.group.modules)):
            factors = module_factors(self._reference, means, glob, k, unaligned)
            norms.append(dense_error_norms(self._dense[k], total, factors))
            self._dense[k] = self._dense[k].new_empty(0)  # release Q_k
        out = torch.tensor(norms, dtype=STAT_DTYPE)
        return GroupErrors(
            aggregation=out[:, 0],
            reference=out[:, 1] if has_reference else None,
            factor_average=out[:, 2],
            fedit=out[:, 3],
        )


class UploadedMeans:
    """The weighted means of one group's factors *as uploaded* (before the gauge), in row
    layout: FedIT's averages of a gauged round's uploads, for its FedIT-equivalent error.

    Kept only where a gauge moves the factors and the error is tracked: one float64 sum per
    trained factor, a ``(K, r, d)`` stack (``stacked``) or ``K`` separate ``(r, d)`` tensors,
    fed with the same order-independent float32 terms as the aggregate's own sums.
    """

    def __init__(
        self,
        group: ModuleGroup,
        trained: frozenset[Factor] | set[Factor],
        terms: TermAccumulator,
        *,
        stacked: bool,
    ) -> None:
        self._terms = terms
        device = terms.device
        self._sums: dict[Factor, Tensor | list[Tensor]] = {}
        for f in trained:
            shape = rows_shape(group, f)
            self._sums[f] = (
                torch.empty(shape, dtype=SUM_DTYPE, device=device)
                if stacked
                else [torch.empty(shape[1:], dtype=SUM_DTYPE, device=device) for _ in group.modules]
            )

    def add(self, which: Factor, rows: Tensor | Sequence[Tensor], weight: float) -> None:
        """``sum += fl32(w X_i)`` for one client's ``which`` rows, a ``(K, r, d)`` stack or
        ``K`` per-module ``(r, d)`` views (not modified)."""
        total = self._sums[which]
        if isinstance(total, Tensor):
            assert isinstance(rows, Tensor)
            self._terms.add_scaled(total, rows, weight)
            return
        for module_sum, x in zip(total, rows, strict=True):
            self._terms.add_scaled(module_sum, x, weight)

    def means(self, total: float, reference: Mapping[Factor, Tensor]) -> dict[Factor, Tensor]:
        """Row-layout float32 ``(K, r, d)`` means, the reference rows for a frozen factor; the
        sums are released."""
        out = {}
        for f in Factor:
            sums = self._sums.pop(f, None)
            if sums is None:
                out[f] = reference[f]
            elif isinstance(sums, Tensor):
                out[f] = mean_of(sums, total)
            else:
                out[f] = torch.stack([mean_of(x, total) for x in sums])
        return out


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
