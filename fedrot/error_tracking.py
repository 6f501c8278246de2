"""The exact aggregation error of a round with memory flat in the number of clients.

The norms derive from one dense ``Q = sum_i w_i dB_i dA_i`` per module or from Gram blocks of
the clients' factors (see :mod:`fedrot.dense_errors` and :func:`fedrot.diagnostics.group_errors`);
both need every pair of clients, so the clients' factors must be seen again at ``finalize``.

How. :class:`GroupErrorTracker` writes each client's factors (as
aggregated) to a scratch file (:mod:`fedrot.factor_spill`) and holds nothing per client but its
weight. ``finalize`` reads them back, one bounded working set at a time:

- while the clients' factors take less room than ``Q`` would (``n r (d_in + d_out) < d_out
  d_in`` per module, times :data:`GRAM_BUDGET`), every client's factors of a slice of modules,
  and the Gram-block path of :func:`fedrot.diagnostics.group_errors` (exact; its ``O(n^2)``
  cost is then below the dense path's);
- past that, ``Q`` a strip of rows at a time: clients read in batches and folded into the strip
  with one GEMM of inner size ``batch r`` each (the GEMM's compute rate, not one rank-r update
  per client bound by reading and writing ``Q``), then the strip's share of the three norms.
  Time: ``2 r d_out d_in`` flops per client and module, linear in the number of clients.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fedrot.adapters import Factor
from fedrot.dense_errors import dense_error_squares, module_factors
from fedrot.diagnostics import STAT_DTYPE, ErrorTerms, GroupErrors, group_errors
from fedrot.factor_spill import SPILL_DTYPE, FactorSpill
from fedrot.module_groups import ModuleGroup, rows_shape
from fedrot.weighted_sums import SUM_DTYPE, TermAccumulator, mean_of

logger = logging.getLogger(__name__)

GRAM_BUDGET = 1.0
"""The Gram path while the clients' factors are below this fraction of ``Q``'s size."""

STRIP_ROWS = 256
"""The dense path builds ``Q`` this many rows at a time (``256 d_in`` floats: 4 MiB for a
4096-wide module)."""

BATCH_RANK = 128
"""The dense path folds ``BATCH_RANK / r`` clients per GEMM: an inner size that keeps the GEMM
near its compute rate, and a batch of ``128 (d_out + 2 d_in)`` floats whatever ``r``."""

GRAM_SLICE_BYTES = 2 * 2**20
"""The Gram path stacks the terms of at most this many bytes of modules at once (at least one
module)."""

DENSE_DTYPE = torch.float32
"""``Q``'s dtype. Float32 suffices: ``Q`` holds only second-order terms, so its round-off is
relative to ``||sum p_i dB_i dA_i||``, far below the first-order size of the update (the
relative error's denominator); docs/benchmarks.md gives the measured difference to float64."""


class GroupErrorTracker:
    """The aggregation error of one module group, fed one client at a time.

    ``reference`` holds the round's reference factors as row-layout float32 stacks
    (``A (K, r, d_in)``, ``B^T (K, r, d_out)``). Each client's factors go to a
    :class:`~fedrot.factor_spill.FactorSpill` in ``scratch`` (None: the system's temporary
    directory) and are read back at ``finalize``. ``products=False`` (a round that freezes a
    factor: then every ``dB_i dA_i`` is zero) keeps nothing per client.

    If the scratch file cannot be written (a full disk), the tracker logs why, drops what it
    holds and ``finalize`` returns None: the round's aggregate is unaffected, its error is
    then unknown.
    """

    def __init__(
        self,
        group: ModuleGroup,
        reference: Mapping[Factor, Tensor],
        *,
        products: bool = True,
        scratch: str | Path | None = None,
    ) -> None:
        self.group = group
        self._reference = reference
        self._products = products
        self._scratch = scratch
        self._spill: FactorSpill | None = None
        self._weights: list[float] = []
        self._failed = False
        item = torch.empty(0, dtype=DENSE_DTYPE).element_size()
        k = len(group.modules)
        self._dense_bytes = k * group.d_out * group.d_in * item

    @property
    def uses_gram(self) -> bool:
        """True while the clients' factors are smaller than ``Q`` would be (times
        :data:`GRAM_BUDGET`): ``finalize`` then takes the Gram path, else the dense one."""
        return self.spilled_bytes() < GRAM_BUDGET * self._dense_bytes

    def spilled_bytes(self) -> int:
        """Bytes of client factors in the scratch file."""
        return 0 if self._spill is None else self._spill.nbytes()

    def add(self, weight: float, rows: Mapping[Factor, Sequence[Tensor]]) -> None:
        """Keep one client's factors as aggregated: ``rows[f][k]`` is module ``k``'s ``(r, d)``
        row-layout factor (written out at once; not modified, not kept)."""
        if not self._products or self._failed:
            return
        try:
            if self._spill is None:
                self._spill = FactorSpill(self.group, self._scratch)
            self._spill.append(rows)
        except OSError as exc:
            logger.warning("the aggregation error of this round is not tracked: %s", exc)
            self._failed = True
            self._close()
            return
        self._weights.append(weight)

    def _close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def finalize(
        self,
        total: float,
        means: Mapping[Factor, Tensor],
        glob: Mapping[Factor, Tensor],
        *,
        has_reference: bool,
        unaligned: Mapping[Factor, Tensor] | None = None,
    ) -> GroupErrors | None:
        """The group's norms (None if the scratch file failed). ``total`` is ``W = sum w_i``
        over every client; ``means`` (the weighted means), ``glob`` (the new global factors)
        and ``unaligned`` (the means of the factors as uploaded, None when no gauge moved them)
        are row-layout float32 stacks like the reference."""
        if self._failed:
            return None
        terms = _Finalize(total, means, glob, has_reference, unaligned)
        try:
            if self._spill is None or self.uses_gram:
                return self._gram_errors(terms)
            return self._dense_errors(terms)
        except OSError as exc:
            logger.warning("the aggregation error of this round is not tracked: %s", exc)
            return None
        finally:
            self._close()

    def _gram_errors(self, terms: _Finalize) -> GroupErrors:
        """Every client's factors of a slice of modules at a time, then the Gram-block norms of
        :func:`fedrot.diagnostics.group_errors`; the slice's stacked terms (``n`` clients and
        6 more per module) take at most :data:`GRAM_SLICE_BYTES`."""
        n, k = len(self._weights), len(self.group.modules)
        items = self.group.rank * (self.group.d_in + self.group.d_out)
        step = max(1, GRAM_SLICE_BYTES // ((n + 6) * items * 4))
        parts = [self._gram_part(terms, slice(i, min(k, i + step))) for i in range(0, k, step)]
        return GroupErrors(
            aggregation=torch.cat([p.aggregation for p in parts]),
            reference=None
            if not terms.has_reference
            else torch.cat([p.reference for p in parts if p.reference is not None]),
            factor_average=torch.cat([p.factor_average for p in parts]),
            fedit=torch.cat([p.fedit for p in parts]),
        )

    def _gram_part(self, terms: _Finalize, part: slice) -> GroupErrors:
        ref, device = self._reference, self._reference[Factor.A].device
        clients: dict[Factor, list[list[Tensor]]] = {Factor.B: [], Factor.A: []}
        if self._spill is not None:
            n, modules = len(self._weights), range(part.start, part.stop)
            buffer = torch.empty(len(modules), n, self._spill.module_items, dtype=SPILL_DTYPE)
            for j, m in enumerate(modules):
                pairs = [self._spill.read_module(i, m, buffer[j, i]) for i in range(n)]
                clients[Factor.B].append([b.to(device) for b, _ in pairs])
                clients[Factor.A].append([a.to(device) for _, a in pairs])
        else:
            clients = {f: [[] for _ in range(part.start, part.stop)] for f in Factor}
        unaligned = terms.unaligned
        return group_errors(
            ErrorTerms(
                clients_B=clients[Factor.B],
                clients_A=clients[Factor.A],
                weights=[w / terms.total for w in self._weights],
                mean_B=terms.means[Factor.B][part],
                mean_A=terms.means[Factor.A][part],
                global_B=terms.glob[Factor.B][part],
                global_A=terms.glob[Factor.A][part],
                ref_B=ref[Factor.B][part] if terms.has_reference else None,
                ref_A=ref[Factor.A][part] if terms.has_reference else None,
                unaligned_B=None if unaligned is None else unaligned[Factor.B][part],
                unaligned_A=None if unaligned is None else unaligned[Factor.A][part],
            )
        )

    def _dense_errors(self, terms: _Finalize) -> GroupErrors:
        """Per module, ``Q = sum_i w_i dB_i dA_i`` :data:`STRIP_ROWS` rows at a time, clients
        read back in batches of :data:`BATCH_RANK` ``/ r`` and folded into the strip with one
        GEMM of inner size about :data:`BATCH_RANK`; each strip's squared norms are summed.
        Memory: the strip, the batch and its centred copy, whatever the number of clients."""
        assert self._spill is not None
        g, spill = self.group, self._spill
        device = self._reference[Factor.A].device
        n = len(self._weights)
        height = min(g.d_out, STRIP_ROWS)
        batch = max(1, min(n, BATCH_RANK // g.rank))
        buffer = torch.empty(batch, spill.module_items, dtype=SPILL_DTYPE)
        strip = torch.empty(height, g.d_in, dtype=DENSE_DTYPE, device=device)
        left = torch.empty(height, batch, g.rank, dtype=DENSE_DTYPE, device=device)
        right = torch.empty(batch, g.rank, g.d_in, dtype=DENSE_DTYPE, device=device)
        weights = torch.tensor(self._weights, dtype=DENSE_DTYPE, device=device)
        split = g.rank * g.d_out
        norms = []
        for k in range(len(g.modules)):
            factors = module_factors(
                self._reference, terms.means, terms.glob, k, terms.unaligned
            )
            ref_B = self._reference[Factor.B][k].mT.to(DENSE_DTYPE)  # (d_out, r)
            ref_A = self._reference[Factor.A][k].to(DENSE_DTYPE)
            squares = torch.zeros(4, dtype=STAT_DTYPE)
            held = None if batch < n else self._read_batch(k, 0, n, buffer, device)
            for top in range(0, g.d_out, height):
                rows = slice(top, min(g.d_out, top + height))
                s = rows.stop - rows.start
                q = strip[:s].zero_()
                for first in range(0, n, batch):
                    count = min(batch, n - first)
                    block = held if held is not None else self._read_batch(
                        k, first, count, buffer, device
                    )
                    B = block[:, :split].view(count, g.rank, g.d_out).permute(2, 0, 1)
                    dB = torch.sub(B[rows], ref_B[rows, None, :], out=left[:s, :count])
                    dB.mul_(weights[None, first : first + count, None])
                    A = block[:, split:].view(count, g.rank, g.d_in)
                    dA = torch.sub(A, ref_A, out=right[:count])
                    q.addmm_(dB.view(s, count * g.rank), dA.view(count * g.rank, g.d_in))
                squares += torch.tensor(
                    dense_error_squares(q, terms.total, factors.rows(rows)), dtype=STAT_DTYPE
                )
            norms.append(squares.sqrt())
        out = torch.stack(norms)
        return GroupErrors(
            aggregation=out[:, 0],
            reference=out[:, 1] if terms.has_reference else None,
            factor_average=out[:, 2],
            fedit=out[:, 3],
        )


    def _read_batch(
        self, k: int, first: int, count: int, buffer: Tensor, device: torch.device
    ) -> Tensor:
        """Clients ``first .. first + count - 1``'s module ``k`` records, on ``device`` in
        ``DENSE_DTYPE`` (a view of ``buffer`` on a float32 CPU run)."""
        assert self._spill is not None
        for j in range(count):
            self._spill.read_module(first + j, k, buffer[j])
        return buffer[:count].to(device, DENSE_DTYPE)


@dataclass(frozen=True)
class _Finalize:
    """What :meth:`GroupErrorTracker.finalize` was given."""

    total: float
    means: Mapping[Factor, Tensor]
    glob: Mapping[Factor, Tensor]
    has_reference: bool
    unaligned: Mapping[Factor, Tensor] | None


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
