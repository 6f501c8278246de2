"""Factor-wise averaging with an optional gauge: FedIT, FedRot-LoRA, FFA-LoRA, RoLoRA, ablations.

The running state is the unnormalised weighted sum ``sum_i w_i X_i`` of each trained factor, in
float64, to which every update adds one float32 term computed from that update alone (see
:mod:`fedrot.weighted_sums`): ``fl32(w_i X_i)`` without a gauge, else ``fl32((w_i L_i) X_i)``
from one GEMM that applies the gauge with the weight folded into the r x r multiplier. The
float64 sum of float32 terms is exact short of a ``2^29`` spread, so the published mean
(divided by ``W`` and rounded once at ``finalize``) does not depend on the order in which the
updates arrived. An aligned update is read twice per factor: once for the Procrustes matrix
``M = X_i X_ref^T`` (and ``||X_i||``), once for the accumulation.

Two ways to hold a group (see :func:`fedrot.module_groups.streams_modules`):

- *stacked* (small modules): the update's factors are copied into the group's buffer so that one
  batched call covers the group; the sums are ``(K, r, d)`` stacks, in row layout when the
  round has a gauge (``A (K, r, d_in)``, ``B^T (K, r, d_out)``; see :mod:`fedrot.alignment`),
  else in the factors' own layout;
- *streamed* (large modules): one GEMM per module straight from the update's own tensors (no
  stacking copy; each GEMM hides its call cost), and one sum tensor per module in the factor's
  own layout.

With ``track_error`` each group has a :class:`~fedrot.error_tracking.GroupErrorTracker` (memory
flat in the number of clients: the clients' factors wait in a scratch file) and, in a round with a gauge, an
:class:`~fedrot.error_tracking.UploadedMeans` for FedIT's error of the same uploads. A round
with a gauge also sums the rotation drift diagnostic (:mod:`fedrot.drift`) from the Procrustes
blocks it has anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedrot.adapters import Adapter, Factor, LoraPair
from fedrot.aggregation import WORK_DTYPE, RoundSetup, StreamingAggregator
from fedrot.alignment import as_rows, expanded_gauge_statistics, procrustes_rotation
from fedrot.diagnostics import GroupErrors, RotationStats
from fedrot.drift import DriftSums, ModuleDrift, client_drift
from fedrot.error_tracking import GroupErrorTracker, UploadedMeans
from fedrot.gauges import Gauge, GaugeProblem, GaugeSolver
from fedrot.module_groups import ModuleGroup, empty_stack, rows_shape, stack_factor, streams_modules
from fedrot.weighted_sums import SUM_DTYPE, mean_of

Rows = Tensor | list[Tensor]
"""A group's factor in row layout: a ``(K, r, d)`` stack, or ``K`` per-module ``(r, d)`` views."""


@dataclass
class _FactorGroupState:
    """One module group's running state.

    ``views[f]`` are the per-module float64 weighted sums of trained factor ``f``: slices of
    the stack ``sums[f]`` for a stacked group, separate own-layout tensors for a streamed one
    (``sums`` then empty). ``work`` are float32 stacking buffers and ``reference`` reference
    stacks, both in the factors' own layout. With a gauge, ``reference_sq`` ``(K,)`` are the
    aligned factor's squared reference norms and, for a streamed group, ``reference_columns``
    its per-module ``X_ref^T`` ``(d, r)`` views. ``errors`` tracks the aggregation error and
    ``uploaded`` FedIT's averages (only with ``track_error``; ``uploaded`` only with a gauge);
    ``drift`` sums the rotation drift (with a gauge).
    """

    streamed: bool
    views: dict[Factor, list[Tensor]]
    sums: dict[Factor, Tensor] = field(default_factory=dict)
    work: dict[Factor, Tensor] = field(default_factory=dict)
    reference: dict[Factor, Tensor] = field(default_factory=dict)
    reference_sq: Tensor | None = None
    reference_columns: list[Tensor] = field(default_factory=list)
    errors: GroupErrorTracker | None = None
    uploaded: UploadedMeans | None = None
    drift: DriftSums | None = None


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
                f: [
                    torch.empty(shapes[f], dtype=SUM_DTYPE, device=self.device)
                    for _ in group.modules
                ]
                for f in trained
            }
            state = _FactorGroupState(streamed=True, views=views)
        else:
            shape = rows_shape if self._aligned is not None else ModuleGroup.stack_shape
            sums = {
                f: torch.empty(shape(group, f), dtype=SUM_DTYPE, device=self.device)
                for f in trained
            }
            state = _FactorGroupState(
                streamed=False,
                views={f: list(s.unbind(0)) for f, s in sums.items()},
                sums=sums,
                work={f: empty_stack(group, f, self.device) for f in trained},
            )
        state.reference = {f: self.reference_stack(group, f) for f in needed}
        if self._aligned is not None:
            self._bind_reference_rows(group, state, self._aligned)
            state.drift = DriftSums()
        if self.setup.track_error:
            rows = {f: as_rows(state.reference[f], f) for f in Factor}
            state.errors = GroupErrorTracker(
                group, rows, products=trained == set(Factor), scratch=self.setup.scratch
            )
            if self._aligned is not None:
                state.uploaded = UploadedMeans(group, trained, self._terms, stacked=not streamed)
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
        for group, state in zip(self._groups, self._state, strict=True):
            if self._aligned is None:
                self._add_plain(group, state, update, w)
            else:
                stats.extend(self._add_aligned(client_id, group, state, update, w))
        return tuple(stats)

    def _add_plain(
        self, group: ModuleGroup, state: _FactorGroupState, update: Adapter, w: float
    ) -> None:
        """``sum += fl32(w X)`` per trained factor: module by module straight from the update's
        tensors for a streamed group, one call on a stacked copy otherwise."""
        for which, views in state.views.items():
            if state.streamed:
                for view, module in zip(views, group.modules, strict=True):
                    factor = update.lora[module].factor(which)
                    self._terms.add_scaled(view, factor.to(self.device), w)
            else:
                stack = stack_factor(update, group, which, state.work[which])
                self._terms.add_scaled(state.sums[which], stack, w)
        if state.errors is not None:
            rows = {
                f: [as_rows(x, f) for x in self._module_factors(update, group, f)]
                for f in state.views
            }
            state.errors.add(w, rows)

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
        one batched GEMM and one norm for a stack, else one of each per module, in turn."""
        assert state.reference_sq is not None
        if isinstance(moving, Tensor):
            assert self._aligned is not None
            reference = as_rows(state.reference[self._aligned], self._aligned)
            cross = torch.bmm(moving, reference.mT)
            moving_sq = torch.linalg.vector_norm(moving, dim=(-2, -1)).square_()
        else:  # the norm right after the GEMM, while the module's factor is still in cache
            cross = torch.empty(len(moving), group.rank, group.rank, device=self.device)
            moving_sq = torch.empty(len(moving), device=self.device)
            columns = state.reference_columns
            for k, (rows, ref) in enumerate(zip(moving, columns, strict=True)):
                torch.mm(rows, ref, out=cross[k])
                torch.linalg.vector_norm(rows, out=moving_sq[k])
            moving_sq.square_()
        return GaugeProblem(client_id, group.modules, cross, moving_sq, state.reference_sq)

    def _add_aligned(
        self,
        client_id: str,
        group: ModuleGroup,
        state: _FactorGroupState,
        update: Adapter,
        w: float,
    ) -> list[RotationStats]:
        aligned = self._aligned
        assert aligned is not None and self._gauge is not None
        other = Factor.B if aligned is Factor.A else Factor.A
        moving, moving_own = self._rows(update, group, state, aligned)
        problem = self._problem(client_id, group, state, moving)
        gauge = self._gauge.solve(problem)
        assert state.drift is not None
        _add_drift(state.drift, gauge, problem, w)
        left = dict(zip((aligned, other), _left_factors(gauge), strict=True))
        self._add_rotated(state, aligned, left[aligned] * w, moving, moving_own)
        kept = {aligned: _rotated(left[aligned], moving)} if state.errors is not None else {}
        if state.uploaded is not None:
            state.uploaded.add(aligned, moving, w)
        rest, rest_own = self._rows(update, group, state, other)
        self._add_rotated(state, other, left[other] * w, rest, rest_own)
        if state.uploaded is not None:
            state.uploaded.add(other, rest, w)
        if state.errors is not None:
            kept[other] = _rotated(left[other], rest)
            state.errors.add(w, kept)
        return _rotation_stats(group, gauge, problem)

    def _module_drift(self, total: float) -> tuple[ModuleDrift, ...]:
        out = []
        for group, state in zip(self._groups, self._state, strict=True):
            means = None if state.drift is None else state.drift.means(total)
            if means is not None:
                rows = zip(*means, strict=True)
                out.extend(ModuleDrift(m, *r) for m, r in zip(group.modules, rows, strict=True))
        return tuple(out)

    def _add_rotated(
        self, state: _FactorGroupState, which: Factor, left: Tensor, rows: Rows, own: list[Tensor]
    ) -> None:
        """``sum += fl32((w L) X)`` (row layout, ``left = w L``). Stacked: one ``bmm``.
        Streamed: one GEMM per module in its own layout, ``(w L) A_i`` or ``B_i (w L)^T``."""
        if isinstance(rows, Tensor):
            term = self._terms.term_buffer(rows.shape)
            self._terms.add(state.sums[which], torch.bmm(left, rows, out=term))
            return
        for total, gauge, x in zip(state.views[which], left.unbind(0), own, strict=True):
            term = self._terms.term_buffer(total.shape)
            if which is Factor.A:
                torch.mm(gauge, x, out=term)
            else:
                torch.mm(x, gauge.mT, out=term)
            self._terms.add(total, term)

    def _finalize_lora(
        self, total: float
    ) -> tuple[dict[str, LoraPair], dict[str, Tensor], list[GroupErrors] | None]:
        lora: dict[str, LoraPair] = {}
        errors: list[GroupErrors | None] = []
        for group, state in zip(self._groups, self._state, strict=True):
            if state.streamed:
                pairs, means = self._finalize_streamed(group, state, total)
            else:
                means = {f: self._mean_rows(state, f, total) for f in Factor}
                pairs = self._unstack(group, means)
            lora.update(pairs)
            if state.errors is not None:
                glob = {
                    f: torch.stack([as_rows(pairs[m].factor(f), f) for m in group.modules])
                    for f in Factor
                }
                glob = {f: g.to(WORK_DTYPE) for f, g in glob.items()}
                uploaded = None
                if state.uploaded is not None:
                    rows = {f: as_rows(state.reference[f], f) for f in Factor}
                    uploaded = state.uploaded.means(total, rows)
                    state.uploaded = None
                errors.append(
                    state.errors.finalize(
                        total, means, glob, has_reference=self._has_reference, unaligned=uploaded
                    )
                )
                state.errors = None
        known = self.setup.track_error and all(e is not None for e in errors)
        return lora, {}, errors if known else None  # type: ignore[return-value]

    def _mean_rows(self, state: _FactorGroupState, which: Factor, total: float) -> Tensor:
        """A stacked group's ``which`` mean in row layout (float32, rounded once from the
        float64 sum), or the reference for a frozen factor."""
        if which not in state.sums:
            return as_rows(state.reference[which], which)
        mean = mean_of(state.sums.pop(which), total)
        return mean if self._aligned is not None else as_rows(mean, which)

    def _finalize_streamed(
        self, group: ModuleGroup, state: _FactorGroupState, total: float
    ) -> tuple[dict[str, LoraPair], dict[Factor, Tensor]]:
        """A streamed group's new global pairs (each module's mean rounded once from its float64
        sum to the reference dtype; frozen factors copies of the reference's) and, when the
        error is tracked, the float32 row-layout mean stacks."""
        assert self._reference is not None
        means: dict[Factor, list[Tensor]] = {f: [] for f in Factor}
        out = {}
        for k, module in enumerate(group.modules):
            ref = self._reference.lora[module]
            tensors = {}
            for f in Factor:
                like = ref.factor(f)
                if f not in state.views:
                    tensors[f] = like.to(device=self.device, copy=True)
                    continue
                mean = mean_of(state.views[f][k], total)
                state.views[f][k] = mean
                tensors[f] = mean if like.dtype == mean.dtype else mean.to(like.dtype)
                means[f].append(as_rows(mean, f))
            out[module] = LoraPair(A=tensors[Factor.A], B=tensors[Factor.B])
        if state.errors is None:
            return out, {}
        stacks = {
            f: torch.stack(means[f]) if f in state.views else as_rows(state.reference[f], f)
            for f in Factor
        }
        return out, stacks


def _rotated(left: Tensor, rows: Rows) -> list[Tensor]:
    """``L X`` per module as separate ``(r, d)`` float32 tensors (for the error tracker, which
    writes them to its scratch file)."""
    if isinstance(rows, Tensor):
        return [torch.mm(g, x) for g, x in zip(left.unbind(0), rows.unbind(0), strict=True)]
    return [torch.mm(g, x) for g, x in zip(left.unbind(0), rows, strict=True)]


def _left_factors(gauge: Gauge) -> tuple[Tensor, Tensor]:
    """Row-layout multipliers ``(s R^T, R^T / s)`` for the aligned and the other factor."""
    left = gauge.rotation.mT
    if gauge.scale is None:
        return left, left
    scale = gauge.scale[:, None, None]
    return left * scale, left / scale


def _add_drift(drift: DriftSums, gauge: Gauge, problem: GaugeProblem, w: float) -> None:
    """One client's rotation drift (:mod:`fedrot.drift`) for the optimal rotation (the gauge's
    Procrustes rotation, solved here for a gauge that has none) and for the gauge applied."""
    optimal = gauge.optimal if gauge.optimal is not None else procrustes_rotation(problem.cross)
    terms = client_drift(problem.cross, problem.moving_sq, problem.reference_sq, optimal,
                         gauge.rotation, gauge.scale)  # fmt: skip
    drift.add(w, terms)


def _rotation_stats(group: ModuleGroup, gauge: Gauge, problem: GaugeProblem) -> list[RotationStats]:
    numbers = expanded_gauge_statistics(
        gauge.rotation, gauge.scale, problem.cross, problem.moving_sq, problem.reference_sq
    )
    values = torch.stack(
        (numbers.rotation_distance, numbers.residual_before, numbers.residual_after), dim=-1
    ).tolist()
    return [RotationStats(m, *row) for m, row in zip(group.modules, values, strict=True)]
