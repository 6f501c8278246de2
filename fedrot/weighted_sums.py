"""Order-independent weighted sums: float32 terms added into float64 totals.

A round's aggregate must not depend on the order in which its updates arrive. A float32 running
mean ``mean <- beta mean + alpha X`` rounds at every step, differently for every order. Here each
client's contribution is one float32 *term* ``t_i = fl32(w_i * X_i)`` (or ``fl32(w_i L_i X_i)``
from one GEMM with the weight folded into the r x r multiplier), computed from that client's
update alone, and the terms are summed into a float64 total that ``finalize`` divides by
``W = sum w_i`` and rounds to float32 once.

Why that is exact. A float32 term has 24 significant bits; a float64 total holds 53, so adding a
term is exact unless the total exceeds the term by about ``2^29``: in that case the term's
lowest bits fall below the total's unit in the last place. Short of that every partial sum is
the exact sum of its terms, the same whatever the order, and the published float32 value is a
function of the set of updates only. Even when an element's terms do span more than ``2^29``,
two orders can only disagree if the float64 rounding (about ``2^-29`` of a float32 unit)
straddles a float32 rounding boundary.

On the CPU a float32 tensor added to a float64 one is converted into a fresh temporary by
PyTorch; :class:`TermAccumulator` converts into a reused scratch buffer instead (one per shape:
a round has a few shapes).
"""

from __future__ import annotations

import torch
from torch import Tensor

SUM_DTYPE = torch.float64
TERM_DTYPE = torch.float32


class TermAccumulator:
    """Adds float32 terms into float64 totals on one device, with reused scratch storage.

    While ``overwrite`` is True (the first update of a round) ``add`` writes the term instead
    of adding it, so the totals may start uninitialised: the result is the same as adding to
    zeros, one pass cheaper.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.overwrite = True
        self._scratch: dict[tuple[torch.dtype, tuple[int, ...]], Tensor] = {}

    def _buffer(self, dtype: torch.dtype, shape: torch.Size | tuple[int, ...]) -> Tensor:
        key = (dtype, tuple(shape))
        buffer = self._scratch.get(key)
        if buffer is None:
            buffer = self._scratch[key] = torch.empty(key[1], dtype=dtype, device=self.device)
        return buffer

    def term_buffer(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Uninitialised contiguous float32 storage of ``shape``, reused by later calls."""
        return self._buffer(TERM_DTYPE, shape)

    def add(self, total: Tensor, term: Tensor) -> None:
        """``total += term``: ``total`` float64, ``term`` float32 of the same shape."""
        if self.overwrite:
            total.copy_(term)
        elif total.device.type != "cpu":
            total.add_(term)  # converted inside the kernel
        else:
            total.add_(self._buffer(SUM_DTYPE, term.shape).copy_(term))

    def add_scaled(self, total: Tensor, x: Tensor, weight: float) -> None:
        """``total += fl32(weight * x)`` for ``x`` of any float dtype, same shape as ``total``."""
        term = self.term_buffer(x.shape)
        if x.dtype != TERM_DTYPE or x.device != term.device:
            x = term.copy_(x)
        self.add(total, torch.mul(x, weight, out=term))


def mean_of(total: Tensor, weight_sum: float, dtype: torch.dtype = TERM_DTYPE) -> Tensor:
    """``total / weight_sum`` rounded once to ``dtype`` (``total`` is divided in place)."""
    return total.div_(weight_sum).to(dtype)
