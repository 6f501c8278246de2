"""Factor-wise averaging with an optional gauge: FedIT, FedRot-LoRA, FFA-LoRA, RoLoRA, ablations.

For the aligned factor ``X`` the running sum holds ``sum w_i L_i (X_i - X_ref)`` and a small
``(K, r, r)`` sum ``sum w_i L_i``; the shared part ``(sum w_i L_i) X_ref`` is applied once at
the end. Each update therefore costs one pass to form ``D = X_i - X_ref`` (which the gauge
statistics need anyway), one batched GEMM for ``D X_ref^T``, one batched SVD per rotation, and
one fused batched GEMM per factor to rotate and accumulate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedrot.adapters import Adapter, Factor, LoraPair
from fedrot.aggregation import (
    WORK_DTYPE,
    RoundSetup,
    StreamingAggregator,
    add_left_product,
    apply_left,
)
from fedrot.alignment import as_rows, cross_gram, gauge_statistics
from fedrot.diagnostics import ErrorTerms, GroupErrors, RotationStats, group_errors
from fedrot.gauges import GaugeProblem, GaugeSolver
from fedrot.module_groups import ModuleGroup, empty_stack, stack_difference, stack_factor


@dataclass
class _FactorGroupState:
    """Running sums of one module group. For the aligned factor ``sums`` holds
    ``sum w L_i (X_i - X_ref)`` and ``common`` holds ``sum w L_i`` ``(K, r, r)``: the shared
    part ``(sum w L_i) X_ref`` is applied once at the end."""

    sums: dict[Factor, Tensor]
    work: dict[Factor, Tensor]
    reference: dict[Factor, Tensor] = field(default_factory=dict)
    reference_gram: Tensor | None = None
    common: Tensor | None = None
    clients: list[dict[Factor, Tensor]] = field(default_factory=list)


class FactorAggregator(StreamingAggregator):
    """Factor-wise weighted averaging, with an optional gauge on the plan's aligned factor.

    Factors the plan does not train are the reference's, unchanged (the update's copies are
    ignored). With ``gauge`` None or an identity gauge this is plain FedIT averaging.
    """

    def __init__(
        self, reference: Adapter | None, setup: RoundSetup, gauge: GaugeSolver | None = None
    ) -> None:
        use_gauge = gauge is not None and not gauge.is_identity
        self._gauge = gauge if use_gauge else None
        self._aligned = setup.plan.aligned if use_gauge else None
        self._state: list[_FactorGroupState] = []
        super().__init__(reference, setup)

    def _aligned_factor(self) -> Factor | None:
        return self.setup.plan.aligned

    def _bind_groups(self) -> None:
        trained = self.setup.plan.trained
        self._state = []
        for group in self._groups:
            state = _FactorGroupState(
                sums={f: torch.zeros(group.stack_shape(f), device=self.device) for f in trained},
                work={f: empty_stack(group, f, self.device) for f in trained},
            )
            needs_reference = set(Factor) - trained
            if self.setup.track_error:
                needs_reference = set(Factor)
            if self._aligned is not None:
                needs_reference.add(self._aligned)
                rows = as_rows(self.reference_stack(group, self._aligned), self._aligned)
                state.reference_gram = cross_gram(rows, rows)
                state.common = torch.zeros_like(state.reference_gram)
            state.reference = {f: self.reference_stack(group, f) for f in needs_reference}
            self._state.append(state)

    def _accumulate(self, client_id: str, update: Adapter, w: float) -> tuple[RotationStats, ...]:
        stats: list[RotationStats] = []
        for group, state in zip(self._groups, self._state, strict=True):
            if self._aligned is None:
                self._add_plain(group, state, update, w)
            else:
                stats.extend(self._add_aligned(client_id, group, state, update, w))
        return tuple(stats)

    def _add_plain(
        self, group: ModuleGroup, state: _FactorGroupState, update: Adapter, w: float
    ) -> None:
        for which, total in state.sums.items():
            stack = stack_factor(update, group, which, state.work[which])
            total.add_(stack, alpha=w)
        if self.setup.track_error:
            state.clients.append({f: s.clone() for f, s in state.work.items()})

    def _add_aligned(
        self,
        client_id: str,
        group: ModuleGroup,
        state: _FactorGroupState,
        update: Adapter,
        w: float,
    ) -> list[RotationStats]:
        aligned = self._aligned
        assert aligned is not None and self._gauge is not None and state.common is not None
        other = Factor.B if aligned is Factor.A else Factor.A
        ref_rows = as_rows(state.reference[aligned], aligned)
        diff = stack_difference(
            update, group, aligned, state.reference[aligned], state.work[aligned]
        )
        diff_rows = as_rows(diff, aligned)
        problem = GaugeProblem(
            client_id=client_id,
            group_index=group.index,
            diff_cross=cross_gram(diff_rows, ref_rows),
            reference_gram=state.reference_gram,  # type: ignore[arg-type]
            diff_norm_sq=torch.linalg.vector_norm(diff, dim=(-2, -1)).square(),
        )
        gauge = self._gauge.solve(problem)
        left = gauge.rotation.mT
        left_aligned = left if gauge.scale is None else left * gauge.scale[:, None, None]
        left_other = left if gauge.scale is None else left / gauge.scale[:, None, None]
        add_left_product(state.sums[aligned], left_aligned, diff, aligned, w)
        state.common.add_(left_aligned, alpha=w)
        other_stack = stack_factor(update, group, other, state.work[other])
        add_left_product(state.sums[other], left_other, other_stack, other, w)
        if self.setup.track_error:
            moved = apply_left(left_aligned, diff + state.reference[aligned], aligned)
            state.clients.append(
                {aligned: moved, other: apply_left(left_other, other_stack, other)}
            )
        numbers = gauge_statistics(
            gauge.rotation,
            gauge.scale,
            problem.diff_cross,
            problem.reference_gram,
            problem.diff_norm_sq,
        )
        rows = zip(
            numbers.rotation_distance.tolist(),
            numbers.residual_before.tolist(),
            numbers.residual_after.tolist(),
            strict=True,
        )
        return [RotationStats(m, *values) for m, values in zip(group.modules, rows, strict=True)]

    def _mean(self, state: _FactorGroupState, which: Factor, total: float) -> Tensor:
        if which not in state.sums:
            return state.reference[which]
        mean = state.sums[which]
        if which is self._aligned:
            assert state.common is not None
            mean.add_(apply_left(state.common, state.reference[which], which))
        return mean.div_(total)

    def _finalize_lora(
        self, total: float
    ) -> tuple[dict[str, LoraPair], dict[str, Tensor], list[GroupErrors] | None]:
        lora: dict[str, LoraPair] = {}
        errors: list[GroupErrors] = []
        p = self._normalised_weights(total)
        for group, state in zip(self._groups, self._state, strict=True):
            means = {f: self._mean(state, f, total) for f in Factor}
            pairs = self._unstack(group, means)
            lora.update(pairs)
            if self.setup.track_error:
                errors.append(self._group_errors(group, state, means, pairs, p))
        return lora, {}, errors if self.setup.track_error else None

    def _group_errors(
        self,
        group: ModuleGroup,
        state: _FactorGroupState,
        means: dict[Factor, Tensor],
        pairs: dict[str, LoraPair],
        p: list[float],
    ) -> GroupErrors:
        clients = state.clients
        state.clients = []
        stacked = {
            f: torch.stack([pairs[m].factor(f) for m in group.modules]).to(WORK_DTYPE)
            for f in Factor
        }
        return group_errors(
            ErrorTerms(
                clients_B=[c.get(Factor.B, state.reference.get(Factor.B)) for c in clients],  # type: ignore[misc]
                clients_A=[c.get(Factor.A, state.reference.get(Factor.A)) for c in clients],  # type: ignore[misc]
                weights=p,
                mean_B=means[Factor.B],
                mean_A=means[Factor.A],
                global_B=stacked[Factor.B],
                global_A=stacked[Factor.A],
                ref_B=state.reference[Factor.B] if self._has_reference else None,
                ref_A=state.reference[Factor.A] if self._has_reference else None,
            )
        )
