"""Aggregators that need the sum of products: FlexLoRA and FedEx-LoRA.

Both keep, per module group, a dense float32 accumulator ``sum w_i B_i A_i`` of shape
``(K, d_out, d_in)``: memory bounded by the adapted base weights and flat in the number of
clients. FlexLoRA re-factorises its weighted mean by truncated SVD; FedEx-LoRA keeps the factor
average and returns the residual ``sum p_i B_i A_i - B_bar A_bar`` for the base weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import Tensor

from fedrot.adapters import Adapter, Factor, LoraPair
from fedrot.aggregation import RoundSetup, StreamingAggregator
from fedrot.alignment import as_rows
from fedrot.diagnostics import ErrorTerms, GroupErrors, RotationStats, group_errors
from fedrot.module_groups import ModuleGroup, empty_stack, stack_factor


class ProductRule(StrEnum):
    """What to make of the mean product: a rank-r SVD (FlexLoRA) or factors + residual (FedEx)."""

    TRUNCATED_SVD = "truncated-svd"
    RESIDUAL = "residual"


@dataclass
class _ProductGroupState:
    sums: dict[Factor, Tensor]
    work: dict[Factor, Tensor]
    products: Tensor
    clients: list[dict[Factor, Tensor]] = field(default_factory=list)


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

    Both factors are trained every round and nothing is rotated. The report's errors compare
    ``sum p_i B_i A_i`` with the global product: ``B_g A_g`` for FlexLoRA; for FedEx
    ``B_g A_g + residual``, evaluated on the dense accumulator (so it is the round-off of
    casting to the output dtype), while ``factor_average_error`` is the Gram-based
    ``||sum p_i B_i A_i - B_bar A_bar||``, the size of the residual folded into the base.
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
                sums={f: torch.zeros(g.stack_shape(f), device=self.device) for f in Factor},
                work={f: empty_stack(g, f, self.device) for f in Factor},
                products=torch.zeros(len(g.modules), g.d_out, g.d_in, device=self.device),
            )
            for g in self._groups
        ]

    def _accumulate(self, client_id: str, update: Adapter, w: float) -> tuple[RotationStats, ...]:
        for group, state in zip(self._groups, self._state, strict=True):
            stacks = {f: stack_factor(update, group, f, state.work[f]) for f in Factor}
            for which, total in state.sums.items():
                total.add_(stacks[which], alpha=w)
            state.products.baddbmm_(stacks[Factor.B], stacks[Factor.A], alpha=w)
            if self.setup.track_error:
                state.clients.append(
                    {
                        f: as_rows(s, f).clone(memory_format=torch.contiguous_format)
                        for f, s in stacks.items()
                    }
                )
        return ()

    def _finalize_lora(
        self, total: float
    ) -> tuple[dict[str, LoraPair], dict[str, Tensor], list[GroupErrors] | None]:
        lora: dict[str, LoraPair] = {}
        deltas: dict[str, Tensor] = {}
        errors: list[GroupErrors] = []
        p = self._normalised_weights(total)
        for group, state in zip(self._groups, self._state, strict=True):
            means = {f: s.div_(total) for f, s in state.sums.items()}
            mean_product = state.products.div_(total)
            if self._rule is ProductRule.TRUNCATED_SVD:
                A_g, B_g = truncated_factors(mean_product, group.rank)
                pairs = self._unstack(group, {Factor.A: A_g, Factor.B: B_g.mT})
            else:
                pairs = self._unstack(group, {f: as_rows(m, f) for f, m in means.items()})
                deltas.update(self._residuals(group, pairs, mean_product))
            lora.update(pairs)
            if self.setup.track_error:
                errors.append(self._group_errors(group, state, means, pairs, deltas, p))
        return lora, deltas, errors if self.setup.track_error else None

    def _residuals(
        self, group: ModuleGroup, pairs: dict[str, LoraPair], mean_product: Tensor
    ) -> dict[str, Tensor]:
        """FedEx-LoRA: ``mean_product - B_g A_g`` per module, float32, with ``B_g A_g`` the
        product of the global factors as handed out (so it also absorbs their rounding to a
        lower-precision dtype)."""
        out = {}
        for k, module in enumerate(group.modules):
            pair = pairs[module]
            out[module] = mean_product[k] - pair.B.to(torch.float32) @ pair.A.to(torch.float32)
        return out

    def _group_errors(
        self,
        group: ModuleGroup,
        state: _ProductGroupState,
        means: dict[Factor, Tensor],
        pairs: dict[str, LoraPair],
        deltas: dict[str, Tensor],
        p: list[float],
    ) -> GroupErrors:
        clients, state.clients = state.clients, []
        glob = {
            f: torch.stack([as_rows(pairs[m].factor(f), f) for m in group.modules]).float()
            for f in Factor
        }
        ref = {}
        if self._has_reference:
            ref = {f: as_rows(self.reference_stack(group, f), f) for f in Factor}
        errors = group_errors(
            ErrorTerms(
                clients_B=[c[Factor.B] for c in clients],
                clients_A=[c[Factor.A] for c in clients],
                weights=p,
                mean_B=as_rows(means[Factor.B], Factor.B),
                mean_A=means[Factor.A],
                global_B=glob[Factor.B],
                global_A=glob[Factor.A],
                ref_B=ref.get(Factor.B),
                ref_A=ref.get(Factor.A),
            )
        )
        if self._rule is ProductRule.TRUNCATED_SVD:
            return errors
        residual = torch.stack([deltas[m] for m in group.modules]).to(torch.float32)
        exact = state.products - glob[Factor.B].mT @ glob[Factor.A] - residual
        dense = torch.linalg.matrix_norm(exact).to(torch.float64)
        return GroupErrors(dense, errors.reference, errors.factor_average)
