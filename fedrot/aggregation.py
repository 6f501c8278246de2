"""Streaming round aggregation: one update at a time, aligned on arrival, summed in place.

The round's reference (the adapter broadcast at its start) is fixed, so every update is aligned
against it as soon as it arrives and added into running float64 weighted sums, one float32 term
per update (see :mod:`fedrot.weighted_sums`): the published adapter, divided and rounded once at
:meth:`RoundAggregator.finalize`, is the same for every arrival order. Nothing per client is kept
beyond what ``track_error=True`` needs for the exact aggregation error, which stays bounded in
the number of clients (see :mod:`fedrot.error_tracking` and docs/design.md, "Memory of a
round"). Modules of one shape form a group (:mod:`fedrot.module_groups`): small modules are
stacked so that one batched call covers the group, large ones are handled one by one from the
update's own tensors; the r x r work of an update (Procrustes, statistics) is one batch per
group on the aggregator's device.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedrot.adapters import Adapter, AdapterSchema, Factor, LoraPair
from fedrot.alignment import as_rows
from fedrot.diagnostics import (
    AggregationReport,
    ClientReport,
    GroupErrors,
    RotationStats,
    global_norm,
    module_errors,
    relative,
)
from fedrot.drift import ModuleDrift
from fedrot.errors import AggregationStateError
from fedrot.module_groups import (
    ModuleGroup,
    check_update,
    empty_stack,
    group_modules,
    stack_factor,
)
from fedrot.weighted_sums import SUM_DTYPE, TermAccumulator, mean_of

if TYPE_CHECKING:
    from fedrot.strategies import RoundPlan

logger = logging.getLogger(__name__)

WORK_DTYPE = torch.float32


@dataclass(frozen=True)
class AggregationResult:
    """The new global adapter (reference dtypes, aggregator's device), FedEx-LoRA's per-module
    base-weight residuals ``sum p_i B_i A_i - B_bar A_bar`` of shape ``(d_out, d_in)`` in
    product units (empty for other strategies), and the round's report."""

    adapter: Adapter
    base_deltas: Mapping[str, Tensor]
    report: AggregationReport


@dataclass(frozen=True)
class RoundSetup:
    """What a strategy tells the aggregator it starts: the plan, how to name itself in the
    report, where to compute, whether to keep what the exact error needs, and the directory
    of the scratch files that hold it (None: the system's temporary directory)."""

    plan: RoundPlan
    strategy: str
    lam: float | None = None
    device: torch.device | str | None = None
    track_error: bool = True
    scratch: str | Path | None = None


class RoundAggregator(ABC):
    """Aggregates one round: ``add`` each client's update, then ``finalize`` once."""

    @abstractmethod
    def add(self, client_id: str, update: Adapter, weight: float) -> ClientReport:
        """Align (when the plan says so) and accumulate one client's full update.

        ``weight > 0`` and finite, else ValueError; an update that does not match the
        reference's schema raises SchemaError; calling after ``finalize`` or twice for one
        ``client_id`` raises AggregationStateError.
        """

    @abstractmethod
    def finalize(self) -> AggregationResult:
        """The aggregate; AggregationStateError when nothing was added or already finalised."""


def update_weight(samples: float, rounds_late: int, staleness_weight: float) -> float:
    """An update's aggregation weight: its sample count ``n_i``, times ``staleness_weight``
    for each round it arrives late (the server's and the simulator's rule)."""
    return float(samples) * staleness_weight**rounds_late


def check_weight(weight: float) -> float:
    value = float(weight)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"client weight must be positive and finite, got {weight!r}")
    return value


class StreamingAggregator(RoundAggregator):
    """Shared state of every aggregator: schema, weights, extras, client reports.

    Subclasses implement ``_bind_groups`` (allocate running sums once the schema is known),
    ``_accumulate`` (one update) and ``_finalize_lora``.
    """

    def __init__(self, reference: Adapter | None, setup: RoundSetup) -> None:
        self.setup = setup
        self._device = None if setup.device is None else torch.device(setup.device)
        self._reference: Adapter | None = None
        self._has_reference = reference is not None
        self._schema = AdapterSchema(rank=0, modules={})
        self._groups: tuple[ModuleGroup, ...] = ()
        self._extra_sums: dict[str, Tensor] = {}
        self._terms = TermAccumulator(torch.device("cpu"))
        self._clients: list[ClientReport] = []
        self._client_ids: set[str] = set()
        self._weights: list[float] = []
        self._finalized = False
        if reference is not None:
            self._bind(reference)

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cpu")

    def _bind(self, reference: Adapter) -> None:
        self._reference = reference
        self._schema = AdapterSchema.of(reference)
        if self._device is None:
            first = next(iter(reference.to_state_dict().values()), None)
            self._device = first.device if first is not None else torch.device("cpu")
        self._groups = group_modules(self._schema)
        self._terms = TermAccumulator(self.device)
        self._extra_sums = {
            key: torch.empty(t.shape, dtype=SUM_DTYPE, device=self.device)
            for key, t in reference.extra.items()
        }
        self._bind_groups()

    def reference_stack(self, group: ModuleGroup, which: Factor) -> Tensor:
        """The reference's ``which`` factors of ``group``, stacked float32 on the device."""
        assert self._reference is not None
        out = empty_stack(group, which, self.device)
        return stack_factor(self._reference, group, which, out)

    def add(self, client_id: str, update: Adapter, weight: float) -> ClientReport:
        if self._finalized:
            raise AggregationStateError(f"cannot add {client_id!r}: the round is finalised")
        w = check_weight(weight)
        if client_id in self._client_ids:
            raise AggregationStateError(f"client {client_id!r} was already added this round")
        if self._reference is None:
            check_update(update, AdapterSchema.of(update))
            self._bind(update)
        else:
            check_update(update, self._schema)
        rotations = self._accumulate(client_id, update, w)
        for key, total in self._extra_sums.items():
            self._terms.add_scaled(total, update.extra[key].to(self.device), w)
        self._terms.overwrite = False
        report = ClientReport(client_id=client_id, weight=w, rotations=rotations)
        self._clients.append(report)
        self._client_ids.add(client_id)
        self._weights.append(w)
        return report

    def finalize(self) -> AggregationResult:
        if self._finalized:
            raise AggregationStateError("the round is already finalised")
        if not self._clients:
            raise AggregationStateError("cannot finalise a round with no update")
        self._finalized = True
        assert self._reference is not None
        total = math.fsum(self._weights)
        lora, deltas, errors = self._finalize_lora(total)
        extra = {
            key: mean_of(s, total, self._reference.extra[key].dtype)
            for key, s in self._extra_sums.items()
        }
        report = self._report(total, errors)
        logger.debug(
            "round %s finalised: %s clients", self.setup.plan.round_index, len(self._clients)
        )
        return AggregationResult(Adapter(lora=lora, extra=extra), deltas, report)

    def _report(self, total: float, errors: list[GroupErrors] | None) -> AggregationReport:
        plan = self.setup.plan
        modules: tuple = ()
        abs_err = rel_err = avg_err = fedit_err = fedit_rel = None
        if errors is not None:
            names = [m for g in self._groups for m in g.modules]
            agg = [v for e in errors for v in e.aggregation.tolist()]
            avg = [v for e in errors for v in e.factor_average.tolist()]
            fedit = [v for e in errors for v in e.fedit.tolist()]
            ref = None
            if self._has_reference:
                ref = [v for e in errors for v in e.reference.tolist()]  # type: ignore[union-attr]
            modules = module_errors(names, agg, ref, avg, fedit)
            abs_err, avg_err, fedit_err = global_norm(agg), global_norm(avg), global_norm(fedit)
            update = None if ref is None else global_norm(ref)
            rel_err, fedit_rel = relative(abs_err, update), relative(fedit_err, update)
        return AggregationReport(
            round_index=plan.round_index,
            strategy=self.setup.strategy,
            aligned=self._aligned_factor(),
            lam=self.setup.lam,
            num_clients=len(self._clients),
            total_weight=total,
            modules=modules,
            aggregation_error=abs_err,
            relative_aggregation_error=rel_err,
            factor_average_error=avg_err,
            clients=tuple(self._clients),
            fedit_aggregation_error=fedit_err,
            fedit_relative_aggregation_error=fedit_rel,
            drift=self._module_drift(total),
        )

    def _unstack(self, group: ModuleGroup, rows: dict[Factor, Tensor]) -> dict[str, LoraPair]:
        """Per-module pairs (own contiguous storage, reference dtypes) from row-layout float32
        stacks ``A (K, r, d_in)``, ``B^T (K, r, d_out)``, one copy per factor (which also
        transposes B and converts the dtype); factors the plan froze are the reference's own
        tensors, copied to the device."""
        assert self._reference is not None
        frozen = set(Factor) - self.setup.plan.trained
        per_module = {f: rows[f].unbind(0) for f in Factor if f not in frozen}
        out = {}
        for k, module in enumerate(group.modules):
            ref = self._reference.lora[module]
            tensors = {}
            for f in Factor:
                like = ref.factor(f)
                if f in frozen:
                    tensors[f] = like.to(device=self.device, copy=True)
                    continue
                target = torch.empty(like.shape, dtype=like.dtype, device=self.device)
                tensors[f] = target.copy_(as_rows(per_module[f][k], f))
            out[module] = LoraPair(A=tensors[Factor.A], B=tensors[Factor.B])
        return out

    def _aligned_factor(self) -> Factor | None:
        return None

    def _module_drift(self, total: float) -> tuple[ModuleDrift, ...]:
        """The rotation drift of every module (:mod:`fedrot.drift`); empty when the round does
        not align."""
        return ()

    @abstractmethod
    def _bind_groups(self) -> None: ...

    @abstractmethod
    def _accumulate(
        self, client_id: str, update: Adapter, w: float
    ) -> tuple[RotationStats, ...]: ...

    @abstractmethod
    def _finalize_lora(
        self, total: float
    ) -> tuple[dict[str, LoraPair], dict[str, Tensor], list[GroupErrors] | None]: ...
