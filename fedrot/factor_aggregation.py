"""Factor-wise averaging with an optional gauge: FedIT, FedRot-LoRA, FFA-LoRA, RoLoRA, ablations.

Without a gauge each trained factor's stack is added into a running sum. With one, both running
sums are kept in row layout (``A (K, r, d_in)``, ``B^T (K, r, d_out)``; see
:mod:`fedrot.alignment`), where a gauge is one left multiplication ``X <- L X`` that a single
fused batched GEMM (``baddbmm_``) applies and accumulates; inputs are read through transposed
views, never copied into row layout (BLAS is slow on ``(d, r)`` operands with a tiny ``r``).

For the aligned factor the running sum holds ``sum w_i L_i (X_i - X_ref)`` and a ``(K, r, r)``
sum ``sum w_i L_i``; the shared part ``(sum w_i L_i) X_ref`` is applied once at the end. An update
therefore costs: form ``D = X_i - X_ref`` (which the gauge statistics need anyway), one batched
GEMM for ``D X_ref^T``, the batched SVDs of the gauge, and one fused GEMM per factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedrot.adapters import Adapter, Factor, LoraPair
from fedrot.aggregation import WORK_DTYPE, RoundSetup, StreamingAggregator
from fedrot.alignment import as_rows, cross_gram, gauge_statistics
from fedrot.diagnostics import ErrorTerms, GroupErrors, RotationStats, group_errors
from fedrot.gauges import Gauge, GaugeProblem, GaugeSolver
from fedrot.module_groups import ModuleGroup, empty_stack, rows_shape, stack_factor


@dataclass
class _FactorGroupState:
    """One module group's running state. ``work`` and ``reference`` are stacks in the factors'
    own layout; ``sums`` are in row layout when the round has a gauge, else in own layout
    (``views`` holds their per-module slices).
    ``clients`` (only with ``track_error``) holds each client's factors as aggregated, in row
    layout."""

    sums: dict[Factor, Tensor]
    work: dict[Factor, Tensor]
    reference: dict[Factor, Tensor] = field(default_factory=dict)
    reference_gram: Tensor | None = None
    common: Tensor | None = None
    clients: list[dict[Factor, Tensor]] = field(default_factory=list)
    views: dict[Factor, list[Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.views = {f: list(total.unbind(0)) for f, total in self.sums.items()}


def _contiguous_rows(stack: Tensor, which: Factor) -> Tensor:
    """A contiguous row-layout copy of a factor stack."""
    return as_rows(stack, which).clone(memory_format=torch.contiguous_format)


class FactorAggregator(StreamingAggregator):
    """Factor-wise weighted averaging, with an optional gauge on the plan's aligned factor.

    Factors the plan does not train are the reference's, unchanged (the update's copies are
    ignored). With ``gauge`` None or an identity gauge this is plain FedIT averaging.
    """

    def __init__(
        self, reference: Adapter | None, setup: RoundSetup, gauge: GaugeSolver | None = None
    ) -> None:
        use_gauge = gauge is not None and not gauge.is_identity and setup.plan.aligned is not None
        self._gauge = gauge if use_gauge else None
        self._aligned = setup.plan.aligned if use_gauge else None
        self._state: list[_FactorGroupState] = []
        super().__init__(reference, setup)

    def _aligned_factor(self) -> Factor | None:
        return self.setup.plan.aligned

    def _bind_groups(self) -> None:
        trained = self.setup.plan.trained
        needed = set(Factor) if self.setup.track_error else set(Factor) - trained
        if self._aligned is not None:
            needed.add(self._aligned)
        self._state = []
        for group in self._groups:
            state = _FactorGroupState(
                sums={
                    f: torch.zeros(self._sum_shape(group, f), device=self.device) for f in trained
                },
                work={f: empty_stack(group, f, self.device) for f in trained},
                reference={f: self.reference_stack(group, f) for f in needed},
            )
            if self._aligned is not None:
                rows = as_rows(state.reference[self._aligned], self._aligned)
                state.reference_gram = cross_gram(rows, rows)
                state.common = torch.zeros_like(state.reference_gram)
            self._state.append(state)

    def _sum_shape(self, group: ModuleGroup, which: Factor) -> tuple[int, int, int]:
        return rows_shape(group, which) if self._aligned else group.stack_shape(which)

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
        """``sum += w X`` per trained factor: one fused multi-tensor add straight from the
        update's tensors (no stacking copy) when they are on the device, else via a stack."""
        for which, total in state.sums.items():
            factors = [update.lora[m].factor(which) for m in group.modules]
            if all(f.device == total.device for f in factors):
                torch._foreach_add_(state.views[which], factors, alpha=w)
            else:
                total.add_(stack_factor(update, group, which, state.work[which]), alpha=w)
        if self.setup.track_error:
            state.clients.append(
                {
                    f: _contiguous_rows(stack_factor(update, group, f, state.work[f]), f)
                    for f in state.sums
                }
            )

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
        assert state.reference_gram is not None
        other = Factor.B if aligned is Factor.A else Factor.A
        diff = stack_factor(update, group, aligned, state.work[aligned])
        diff = as_rows(diff.sub_(state.reference[aligned]), aligned)
        problem = GaugeProblem(
            client_id=client_id,
            modules=group.modules,
            diff_cross=cross_gram(diff, as_rows(state.reference[aligned], aligned)),
            reference_gram=state.reference_gram,
            diff_norm_sq=torch.linalg.vector_norm(diff, dim=(-2, -1)).square(),
        )
        gauge = self._gauge.solve(problem)
        left_aligned, left_other = _left_factors(gauge)
        state.sums[aligned].baddbmm_(left_aligned, diff, alpha=w)
        state.common.add_(left_aligned, alpha=w)
        moving = as_rows(stack_factor(update, group, other, state.work[other]), other)
        state.sums[other].baddbmm_(left_other, moving, alpha=w)
        if self.setup.track_error:
            whole = diff + as_rows(state.reference[aligned], aligned)
            state.clients.append(
                {aligned: torch.bmm(left_aligned, whole), other: torch.bmm(left_other, moving)}
            )
        return _rotation_stats(group, gauge, problem)

    def _mean_rows(self, state: _FactorGroupState, which: Factor, total: float) -> Tensor:
        """The new global ``which`` factors of a group, float32 row layout."""
        if which not in state.sums:
            return as_rows(state.reference[which], which)
        mean = state.sums[which]
        if which is self._aligned:
            assert state.common is not None
            mean.baddbmm_(state.common, as_rows(state.reference[which], which))
        mean.div_(total)
        return mean if self._aligned is not None else as_rows(mean, which)

    def _finalize_lora(
        self, total: float
    ) -> tuple[dict[str, LoraPair], dict[str, Tensor], list[GroupErrors] | None]:
        lora: dict[str, LoraPair] = {}
        errors: list[GroupErrors] = []
        p = self._normalised_weights(total)
        for group, state in zip(self._groups, self._state, strict=True):
            means = {f: self._mean_rows(state, f, total) for f in Factor}
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
        clients, state.clients = state.clients, []
        glob = {
            f: torch.stack([as_rows(pairs[m].factor(f), f) for m in group.modules]).to(WORK_DTYPE)
            for f in Factor
        }
        ref = {f: as_rows(state.reference[f], f) for f in Factor}
        return group_errors(
            ErrorTerms(
                clients_B=[c.get(Factor.B, ref[Factor.B]) for c in clients],
                clients_A=[c.get(Factor.A, ref[Factor.A]) for c in clients],
                weights=p,
                mean_B=means[Factor.B],
                mean_A=means[Factor.A],
                global_B=glob[Factor.B],
                global_A=glob[Factor.A],
                ref_B=ref[Factor.B] if self._has_reference else None,
                ref_A=ref[Factor.A] if self._has_reference else None,
            )
        )


def _left_factors(gauge: Gauge) -> tuple[Tensor, Tensor]:
    """Row-layout multipliers ``(s R^T, R^T / s)`` for the aligned and the other factor."""
    left = gauge.rotation.mT
    if gauge.scale is None:
        return left, left
    scale = gauge.scale[:, None, None]
    return left * scale, left / scale


def _rotation_stats(group: ModuleGroup, gauge: Gauge, problem: GaugeProblem) -> list[RotationStats]:
    numbers = gauge_statistics(
        gauge.rotation,
        gauge.scale,
        problem.diff_cross,
        problem.reference_gram,
        problem.diff_norm_sq,
    )
    values = torch.stack(
        (numbers.rotation_distance, numbers.residual_before, numbers.residual_after), dim=-1
    ).tolist()
    return [RotationStats(m, *row) for m, row in zip(group.modules, values, strict=True)]
