"""Aggregators that need the sum of products: FlexLoRA and FedEx-LoRA.

Both keep, per module, a dense float64 accumulator ``sum_i w_i (B_i - B_ref)(A_i - A_ref)`` of
shape ``(d_out, d_in)`` (float32 terms summed in float64, so the result does not depend on the
arrival order; see :mod:`fedrot.weighted_sums`): memory bounded by twice the adapted base
weights and flat in the number of clients. FlexLoRA re-factorises its weighted mean by truncated
SVD; FedEx-LoRA keeps the factor average and returns the residual
``sum p_i B_i A_i - B_bar A_bar`` for the base weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor

from fedrot.adapters import Adapter, Factor, LoraPair
from fedrot.aggregation import RoundSetup, StreamingAggregator
from fedrot.alignment import as_rows
from fedrot.diagnostics import GroupErrors, RotationStats
from fedrot.dense_errors import (
    ModuleFactors,
    dense_error_norms,
    frobenius,
    module_factors,
    to_factor_average_error,
    to_global_error,
    to_reference_error,
)
from fedrot.module_groups import ModuleGroup, empty_stack, stack_factor
from fedrot.weighted_sums import SUM_DTYPE


class ProductRule(StrEnum):
    """What to make of the mean product: a rank-r SVD (FlexLoRA) or factors + residual (FedEx)."""

    TRUNCATED_SVD = "truncated-svd"
    RESIDUAL = "residual"


@dataclass
class _ProductGroupState:
    """``sums[f]``: float64 weighted sums of the factors, own layout; ``work``: float32 stacking
    buffers; ``reference``: the reference's float32 stacks; ``products[k]``: module ``k``'s
    float64 ``Q = sum_i w_i (B_i - B_ref)(A_i - A_ref)`` ``(d_out, d_in)``."""

    sums: dict[Factor, Tensor]
    work: dict[Factor, Tensor]
    reference: dict[Factor, Tensor]
    products: list[Tensor]


def truncated_factors(product: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors of ``product (K, d_out, d_in)``: SVD ``U S V^T``,
    ``B = U_r S_r^(1/2)`` ``(K, d_out, r)``, ``A = S_r^(1/2) V_r^T`` ``(K, r, d_in)``. Float32.
    A rank above ``min(d_out, d_in)`` (more than the SVD has) is filled with zero components."""
    u, s, vh = torch.linalg.svd(product.to(torch.float32), full_matrices=False)
    root = s[..., :rank].sqrt()
    A, B = root[..., :, None] * vh[..., :rank, :], u[..., :rank] * root[..., None, :]
    missing = rank - root.shape[-1]
    if missing > 0:
        A = torch.nn.functional.pad(A, (0, 0, 0, missing))
        B = torch.nn.functional.pad(B, (0, missing))
    return A, B


class ProductAggregator(StreamingAggregator):
    """FlexLoRA (``ProductRule.TRUNCATED_SVD``) or FedEx-LoRA (``ProductRule.RESIDUAL``).

    Both factors are trained every round and nothing is rotated. The dense sum is kept around
    the reference, ``Q = sum_i w_i dB_i dA_i`` (see :mod:`fedrot.error_tracking`): the mean
    product is ``S = B_bar A_bar + Q / W - dB_bar dA_bar``, FedEx's residual ``S - B_g A_g``
    needs no cancelling subtraction of large products, and the report's three norms come from
    the same ``Q`` with no per-client storage. The means enter in float64 (the float32 rounding
    of a mean would otherwise show in FlexLoRA's ``S - B_g A_g``, whose factors are far from
    the means). FedEx's aggregation error compares ``S`` with ``B_g A_g + residual`` as
    published: the float32 rounding of the residual, evaluated in float64.
    """

    def __init__(self, reference: Adapter | None, setup: RoundSetup, rule: ProductRule) -> None:
        if setup.plan.trained != frozenset(Factor) or setup.plan.aligned is not None:
            raise ValueError(
                f"{setup.strategy} trains both factors and aligns none; got trained="
                f"{sorted(setup.plan.trained)}, aligned={setup.plan.aligned}"
            )
        self._rule = rule
        self._state: list[_ProductGroupState] = []
        super().__init__(reference, setup)

    def _bind_groups(self) -> None:
        self._state = [
            _ProductGroupState(
                sums={f: empty_stack(g, f, self.device, SUM_DTYPE) for f in Factor},
                work={f: empty_stack(g, f, self.device) for f in Factor},
                reference={f: self.reference_stack(g, f) for f in Factor},
                products=[
                    torch.empty(g.d_out, g.d_in, dtype=SUM_DTYPE, device=self.device)
                    for _ in g.modules
                ],
            )
            for g in self._groups
        ]

    def _accumulate(self, client_id: str, update: Adapter, w: float) -> tuple[RotationStats, ...]:
        """``sum += fl32(w X)`` per factor and ``Q_k += fl32((w dB_k) dA_k)`` per module."""
        for group, state in zip(self._groups, self._state, strict=True):
            stacks = {f: stack_factor(update, group, f, state.work[f]) for f in Factor}
            for which, total in state.sums.items():
                self._terms.add_scaled(total, stacks[which], w)
            left = stacks[Factor.B].sub_(state.reference[Factor.B]).mul_(w)
            right = stacks[Factor.A].sub_(state.reference[Factor.A])
            for total, dB, dA in zip(state.products, left, right, strict=True):
                term = self._terms.term_buffer(total.shape)
                self._terms.add(total, torch.mm(dB, dA, out=term))
        return ()

    def _finalize_lora(
        self, total: float
    ) -> tuple[dict[str, LoraPair], dict[str, Tensor], list[GroupErrors] | None]:
        lora: dict[str, LoraPair] = {}
        deltas: dict[str, Tensor] = {}
        errors: list[GroupErrors] = []
        for group, state in zip(self._groups, self._state, strict=True):
            means = {f: as_rows(state.sums.pop(f).div_(total), f) for f in Factor}
            if self._rule is ProductRule.TRUNCATED_SVD:
                pairs = self._truncated_pairs(group, state, means, total)
            else:
                pairs = self._unstack(group, {f: m.to(torch.float32) for f, m in means.items()})
            lora.update(pairs)
            norms = self._finish_modules(group, state, means, pairs, total, deltas)
            if self.setup.track_error:
                out = torch.tensor(norms, dtype=torch.float64)
                ref = out[:, 1] if self._has_reference else None
                errors.append(GroupErrors(out[:, 0], ref, out[:, 2], out[:, 3]))
        return lora, deltas, errors if self.setup.track_error else None

    def _truncated_pairs(
        self,
        group: ModuleGroup,
        state: _ProductGroupState,
        means: dict[Factor, Tensor],
        total: float,
    ) -> dict[str, LoraPair]:
        """FlexLoRA: per module, the rank-r SVD of ``S = Q / W - dB_bar dA_bar + B_bar A_bar``
        formed in float32 (one ``d_out x d_in`` temporary at a time)."""
        As, Bs = [], []
        for k in range(len(group.modules)):
            f = self._factors(state, means, means, k)
            product = state.products[k].to(torch.float32).div_(total)
            dB, dA = (f.mean_B - f.ref_B).float(), (f.mean_A - f.ref_A).float()
            product.addmm_(dB, dA, alpha=-1.0).addmm_(f.mean_B.float(), f.mean_A.float())
            A, B = truncated_factors(product[None], group.rank)
            As.append(A[0])
            Bs.append(B[0].mT)
        return self._unstack(group, {Factor.A: torch.stack(As), Factor.B: torch.stack(Bs)})

    def _finish_modules(
        self,
        group: ModuleGroup,
        state: _ProductGroupState,
        means: dict[Factor, Tensor],
        pairs: dict[str, LoraPair],
        total: float,
        deltas: dict[str, Tensor],
    ) -> list[tuple[float, float, float, float]]:
        """Per module (``Q`` overwritten, then released): FedEx's residual into ``deltas`` and,
        with ``track_error``, the four norms (no gauge: FedIT's is the factor-average one)."""
        glob = {
            f: torch.stack([as_rows(pairs[m].factor(f), f) for m in group.modules]).float()
            for f in Factor
        }
        norms = []
        for k, module in enumerate(group.modules):
            f, products = self._factors(state, means, glob, k), state.products[k]
            if self._rule is ProductRule.RESIDUAL:
                norms.append(self._residual(products, total, f, deltas, module))
            elif self.setup.track_error:
                norms.append(dense_error_norms(products, total, f))
            state.products[k] = products.new_empty(0)  # release Q_k
        return norms

    def _residual(
        self,
        products: Tensor,
        total: float,
        f: ModuleFactors,
        deltas: dict[str, Tensor],
        module: str,
    ) -> tuple[float, float, float, float]:
        """FedEx-LoRA: ``deltas[module] = S - B_g A_g`` rounded once to float32 (``B_g A_g`` as
        handed out, so it also absorbs the rounding of the factors to a lower-precision dtype)
        and, with ``track_error``, the norms, the aggregation error being what that rounding
        leaves of ``S - B_g A_g - residual``."""
        to_factor_average_error(products, total, f)
        average = frobenius(products) if self.setup.track_error else 0.0
        to_global_error(products, f)
        residual = deltas[module] = products.to(torch.float32)
        if not self.setup.track_error:
            return 0.0, 0.0, 0.0, 0.0
        aggregation = frobenius(products.sub_(residual))
        to_reference_error(products.add_(residual), f)
        return aggregation, frobenius(products), average, average

    def _factors(
        self,
        state: _ProductGroupState,
        means: dict[Factor, Tensor],
        glob: dict[Factor, Tensor],
        k: int,
    ) -> ModuleFactors:
        rows = {f: as_rows(state.reference[f], f) for f in Factor}
        return module_factors(rows, means, glob, k)
