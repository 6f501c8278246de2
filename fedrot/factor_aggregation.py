"""Factor-wise averaging with an optional gauge: FedIT, FedRot-LoRA, FFA-LoRA, RoLoRA, ablations.

The running state is the weighted *mean* so far, updated in place by one fused call per
factor with no temporaries: ``mean <- beta mean + alpha X`` with ``alpha = w_i / W_i``,
``beta = W_(i-1) / W_i`` (``W_i`` the weights seen so far), a ``lerp_`` without a gauge, else a
GEMM that applies the gauge and blends at once (``addmm_`` / ``baddbmm_`` with ``beta``,
reading the update through transposed views). The first update is written (``beta = 0``), so
the state is never zero-filled, and ``finalize`` has nothing left to divide. An aligned update
is read twice per factor: once for the Procrustes matrix ``M = X_i X_ref^T`` (and ``||X_i||``),
once for the accumulation.

Two ways to hold a group (see :func:`fedrot.module_groups.streams_modules`):

- *stacked* (small modules): the update's factors are copied into the group's buffer so that one
  batched call covers the group; the sums are ``(K, r, d)`` stacks, in row layout when the
  round has a gauge (``A (K, r, d_in)``, ``B^T (K, r, d_out)``; see :mod:`fedrot.alignment`),
  else in the factors' own layout;
- *streamed* (large modules): one GEMM per module straight from the update's own tensors (no
  stacking copy; each GEMM hides its call cost), and one sum tensor per module in the factor's
  own layout that ``finalize`` divides in place and hands out as the new global factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedrot.adapters import Adapter, Factor, LoraPair
from fedrot.aggregation import WORK_DTYPE, RoundSetup, StreamingAggregator
from fedrot.alignment import as_rows, expanded_gauge_statistics
from fedrot.diagnostics import ErrorTerms, GroupErrors, RotationStats, group_errors
from fedrot.gauges import Gauge, GaugeProblem, GaugeSolver
from fedrot.module_groups import ModuleGroup, empty_stack, rows_shape, stack_factor, streams_modules

Rows = Tensor | list[Tensor]
"""A group's factor in row layout: a ``(K, r, d)`` stack, or ``K`` per-module ``(r, d)`` views."""


@dataclass
class _FactorGroupState:
    """One module group's running state.

    ``views[f]`` are the per-module running means of trained factor ``f``: slices of the stack
    ``sums[f]`` for a stacked group, separate own-layout tensors for a streamed one (``sums``
    then empty). ``work`` are stacking buffers and ``reference`` reference stacks, both in the
    factors' own layout. With a gauge, ``reference_sq`` ``(K,)`` are the aligned factor's
    squared reference norms and, for a streamed group, ``reference_columns`` its per-module
    ``X_ref^T`` ``(d, r)`` views. ``clients`` (only with
    ``track_error``) holds each client's factors as aggregated, as row-layout stacks. The
    sums hold the weighted mean of the updates so far and are uninitialised until the first.
    """

    streamed: bool
    views: dict[Factor, list[Tensor]]
    sums: dict[Factor, Tensor] = field(default_factory=dict)
    work: dict[Factor, Tensor] = field(default_factory=dict)
    reference: dict[Factor, Tensor] = field(default_factory=dict)
    reference_sq: Tensor | None = None
    reference_columns: list[Tensor] = field(default_factory=list)
    clients: list[dict[Factor, Tensor]] = field(default_factory=list)


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
        self._seen = 0.0
        super().__init__(reference, setup)

    def _aligned_factor(self) -> Factor | None:
        return self.setup.plan.aligned

    def _bind_groups(self) -> None:
        self._state = [self._bind_group(group) for group in self._groups]

    def _bind_group(self, group: ModuleGroup) -> _FactorGroupState:
        trained, streamed = self.setup.plan.trained, streams_modules(group)
        needed = set(Factor) if self.setup.track_error else set()
        if not streamed:
            needed |= set(Factor) - trained
            needed |= {self._aligned} if self._aligned is not None else set()
        if streamed:
            shapes = {Factor.A: (group.rank, group.d_in), Factor.B: (group.d_out, group.rank)}
            views = {
                f: [torch.empty(shapes[f], device=self.device) for _ in group.modules]
                for f in trained
            }
            state = _FactorGroupState(streamed=True, views=views)
        else:
            shape = rows_shape if self._aligned is not None else ModuleGroup.stack_shape
            sums = {f: torch.empty(shape(group, f), device=self.device) for f in trained}
            state = _FactorGroupState(
                streamed=False,
                views={f: list(s.unbind(0)) for f, s in sums.items()},
                sums=sums,
                work={f: empty_stack(group, f, self.device) for f in trained},
            )
        state.reference = {f: self.reference_stack(group, f) for f in needed}
        if self._aligned is not None:
            self._bind_reference_rows(group, state, self._aligned)
        return state

    def _bind_reference_rows(
        self, group: ModuleGroup, state: _FactorGroupState, aligned: Factor
    ) -> None:
        """The aligned factor's squared reference norms and, for a streamed group, its
        ``X_ref^T`` views of the reference's own tensors."""
        if not state.streamed:
            rows = as_rows(state.reference[aligned], aligned)
            state.reference_sq = torch.linalg.vector_norm(rows, dim=(-2, -1)).square_()
        else:
            assert self._reference is not None
            factors = self._module_factors(self._reference, group, aligned)
            state.reference_columns = [as_rows(x, aligned).mT for x in factors]
            state.reference_sq = torch.stack([torch.linalg.vector_norm(x) for x in factors])
            state.reference_sq.square_()

    def _module_factors(self, adapter: Adapter, group: ModuleGroup, which: Factor) -> list[Tensor]:
        """``adapter``'s ``which`` factors of ``group`` in their own layout, float32 on the
        device; a factor is converted (copied) only when it is not already."""
        out = []
        for module in group.modules:
            factor = adapter.lora[module].factor(which)
            if factor.dtype != WORK_DTYPE or factor.device != self.device:
                factor = factor.to(device=self.device, dtype=WORK_DTYPE)
            out.append(factor)
        return out

    def _accumulate(self, client_id: str, update: Adapter, w: float) -> tuple[RotationStats, ...]:
        stats: list[RotationStats] = []
        seen = self._seen + w
        step = _Step(beta=self._seen / seen, alpha=w / seen)
        for group, state in zip(self._groups, self._state, strict=True):
            if self._aligned is None:
                self._add_plain(group, state, update, step)
            else:
                stats.extend(self._add_aligned(client_id, group, state, update, step))
        self._seen = seen
        return tuple(stats)

    def _add_plain(
        self, group: ModuleGroup, state: _FactorGroupState, update: Adapter, step: _Step
    ) -> None:
        """``mean <- beta mean + alpha X`` per trained factor, in place: module by module
        straight from the update's tensors when they are on the device, else via a converting
        stack."""
        for which, views in state.views.items():
            factors = [update.lora[m].factor(which) for m in group.modules]
            if state.streamed or all(f.device == self.device for f in factors):
                for view, factor in zip(views, factors, strict=True):
                    _blend(view, factor.to(self.device), step)
            else:
                stack = stack_factor(update, group, which, state.work[which])
                _blend(state.sums[which], stack, step)
        if self.setup.track_error:
            state.clients.append(
                {
                    f: torch.stack([as_rows(x, f) for x in self._module_factors(update, group, f)])
                    for f in state.views
                }
            )

    def _rows(
        self, update: Adapter, group: ModuleGroup, state: _FactorGroupState, which: Factor
    ) -> tuple[Rows, list[Tensor]]:
        """The update's ``which`` factors in row layout (a stack copied into ``state.work``
        for a stacked group, per-module views for a streamed one) and, for a streamed group,
        the own-layout tensors those views look at."""
        if not state.streamed:
            return as_rows(stack_factor(update, group, which, state.work[which]), which), []
        factors = self._module_factors(update, group, which)
        return [as_rows(x, which) for x in factors], factors

    def _problem(
        self, client_id: str, group: ModuleGroup, state: _FactorGroupState, moving: Rows
    ) -> GaugeProblem:
        """The Procrustes matrices ``M = X_i X_ref^T`` of one group and the norms ``||X_i||^2``:
        one batched GEMM and one norm for a stack, else one of each per module."""
        assert state.reference_sq is not None
        if isinstance(moving, Tensor):
            assert self._aligned is not None
            reference = as_rows(state.reference[self._aligned], self._aligned)
            cross = torch.bmm(moving, reference.mT)
            moving_sq = torch.linalg.vector_norm(moving, dim=(-2, -1)).square_()
        else:
            cross = torch.empty(len(moving), group.rank, group.rank, device=self.device)
            columns = state.reference_columns
            for out, rows, ref in zip(cross.unbind(0), moving, columns, strict=True):
                torch.mm(rows, ref, out=out)
            moving_sq = torch.stack([torch.linalg.vector_norm(rows) for rows in moving]).square_()
        return GaugeProblem(client_id, group.modules, cross, moving_sq, state.reference_sq)

    def _add_aligned(
        self,
        client_id: str,
        group: ModuleGroup,
        state: _FactorGroupState,
        update: Adapter,
        step: _Step,
    ) -> list[RotationStats]:
        aligned = self._aligned
        assert aligned is not None and self._gauge is not None
        other = Factor.B if aligned is Factor.A else Factor.A
        moving, moving_own = self._rows(update, group, state, aligned)
        problem = self._problem(client_id, group, state, moving)
        gauge = self._gauge.solve(problem)
        left = dict(zip((aligned, other), _left_factors(gauge), strict=True))
        self._add_rotated(state, aligned, left[aligned], moving, moving_own, step)
        rest, rest_own = self._rows(update, group, state, other)
        self._add_rotated(state, other, left[other], rest, rest_own, step)
        if self.setup.track_error:
            state.clients.append(
                {aligned: _rotated(left[aligned], moving), other: _rotated(left[other], rest)}
            )
        return _rotation_stats(group, gauge, problem)

    def _add_rotated(
        self,
        state: _FactorGroupState,
        which: Factor,
        left: Tensor,
        rows: Rows,
        own: list[Tensor],
        step: _Step,
    ) -> None:
        """``mean <- beta mean + alpha L X`` (row layout), in place (``beta = 0`` ignores the
        uninitialised state). Stacked: one ``baddbmm_``. Streamed: one ``addmm_`` per module
        on its own-layout mean, ``A <- beta A + alpha L A_i`` or ``B <- beta B + alpha B_i L^T``."""
        beta, alpha = step.beta, step.alpha
        if isinstance(rows, Tensor):
            state.sums[which].baddbmm_(left, rows, beta=beta, alpha=alpha)
            return
        for total, gauge, x in zip(state.views[which], left.unbind(0), own, strict=True):
            if which is Factor.A:
                total.addmm_(gauge, x, beta=beta, alpha=alpha)
            else:
                total.addmm_(x, gauge.mT, beta=beta, alpha=alpha)

    def _finalize_lora(
        self, total: float
    ) -> tuple[dict[str, LoraPair], dict[str, Tensor], list[GroupErrors] | None]:
        lora: dict[str, LoraPair] = {}
        errors: list[GroupErrors] = []
        p = self._normalised_weights(total)
        for group, state in zip(self._groups, self._state, strict=True):
            if state.streamed:
                pairs = self._finalize_streamed(group, state)
                lora.update(pairs)
                if self.setup.track_error:
                    means = {f: self._stacked_rows(state, f) for f in Factor}
                    errors.append(self._group_errors(group, state, means, pairs, p))
                continue
            means = {f: self._sum_rows(state, f) for f in Factor}
            pairs = self._unstack(group, means)
            lora.update(pairs)
            if self.setup.track_error:
                errors.append(self._group_errors(group, state, means, pairs, p))
        return lora, {}, errors if self.setup.track_error else None

    def _sum_rows(self, state: _FactorGroupState, which: Factor) -> Tensor:
        """A stacked group's ``which`` mean in row layout, or the reference for a frozen
        factor (float32)."""
        if which not in state.sums:
            return as_rows(state.reference[which], which)
        total = state.sums[which]
        return total if self._aligned is not None else as_rows(total, which)

    def _finalize_streamed(
        self, group: ModuleGroup, state: _FactorGroupState
    ) -> dict[str, LoraPair]:
        """A streamed group's new global pairs: each module's means handed out as they are
        (converted to the reference dtype if it differs); frozen factors are copies of the
        reference's."""
        assert self._reference is not None
        out = {}
        for k, module in enumerate(group.modules):
            ref = self._reference.lora[module]
            tensors = {}
            for f in Factor:
                like = ref.factor(f)
                if f in state.views:
                    tensors[f] = state.views[f][k].to(like.dtype)
                else:
                    tensors[f] = like.to(device=self.device, copy=True)
            out[module] = LoraPair(A=tensors[Factor.A], B=tensors[Factor.B])
        return out

    def _stacked_rows(self, state: _FactorGroupState, which: Factor) -> Tensor:
        """The mean ``which`` factors of a streamed group as a float32 row-layout stack."""
        if which not in state.views:
            return as_rows(state.reference[which], which)
        return torch.stack([as_rows(v, which) for v in state.views[which]])

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


@dataclass(frozen=True)
class _Step:
    """One update's blend into the running mean: ``mean <- beta mean + alpha X`` with
    ``alpha = w_i / W_i`` and ``beta = W_(i-1) / W_i``; ``beta = 0`` for the first update."""

    beta: float
    alpha: float


def _blend(mean: Tensor, x: Tensor, step: _Step) -> None:
    """``mean <- beta mean + alpha x`` in place, one pass: ``lerp_`` (``beta = 1 - alpha``), or
    a scaled copy for the first update (the uninitialised ``mean`` is never read)."""
    if step.beta == 0.0:
        torch.mul(x, step.alpha, out=mean)
    elif x.dtype == mean.dtype:
        mean.lerp_(x, step.alpha)
    else:
        mean.mul_(step.beta).add_(x, alpha=step.alpha)


def _rotated(left: Tensor, rows: Rows) -> Tensor:
    """``L X`` as a new contiguous ``(K, r, d)`` float32 stack (for ``track_error``)."""
    return torch.bmm(left, rows if isinstance(rows, Tensor) else torch.stack(rows))


def _left_factors(gauge: Gauge) -> tuple[Tensor, Tensor]:
    """Row-layout multipliers ``(s R^T, R^T / s)`` for the aligned and the other factor."""
    left = gauge.rotation.mT
    if gauge.scale is None:
        return left, left
    scale = gauge.scale[:, None, None]
    return left * scale, left / scale


def _rotation_stats(group: ModuleGroup, gauge: Gauge, problem: GaugeProblem) -> list[RotationStats]:
    numbers = expanded_gauge_statistics(
        gauge.rotation, gauge.scale, problem.cross, problem.moving_sq, problem.reference_sq
    )
    values = torch.stack(
        (numbers.rotation_distance, numbers.residual_before, numbers.residual_after), dim=-1
    ).tolist()
    return [RotationStats(m, *row) for m, row in zip(group.modules, values, strict=True)]
