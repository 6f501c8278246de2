"""Clients' factors of one module group, kept on disk until a tracked round finalises.

The exact aggregation error needs every pair of clients (see :mod:`fedrot.error_tracking`), so a
tracked round must see each client's factors again at ``finalize``. Kept in memory they grow
with the number of clients; here each client's row-layout factors are appended to an unlinked
scratch file (it disappears when closed, or with the process) and read back module by module
into buffers the caller owns, so a round's memory does not depend on how many clients it has.

Layout: client-major records; within a record, module ``k``'s ``B^T (r, d_out)`` then its
``A (r, d_in)``, float32, contiguous. One module of one client is one read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from fedrot.adapters import Factor
from fedrot.module_groups import ModuleGroup

SPILL_DTYPE = torch.float32


class FactorSpill:
    """Append-only store of one group's client factors in an unlinked temporary file.

    ``directory`` is where the file lives (None: the system's temporary directory); put it on
    a disk, not a RAM-backed filesystem, when clients are many or large. ``len(spill)`` is the
    number of clients appended.
    """

    def __init__(self, group: ModuleGroup, directory: str | Path | None = None) -> None:
        self.group = group
        self._module_items = group.rank * (group.d_out + group.d_in)
        self._client_bytes = len(group.modules) * self._module_items * 4
        self._file = tempfile.TemporaryFile(dir=directory, prefix="fedrot-factors-")
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def module_items(self) -> int:
        """Float32 items of one client's module record: ``r (d_out + d_in)``."""
        return self._module_items

    def nbytes(self) -> int:
        """Bytes on disk."""
        return self._count * self._client_bytes

    def append(self, rows: Mapping[Factor, Sequence[Tensor]]) -> None:
        """Write one client's factors: ``rows[f][k]`` is module ``k``'s ``(r, d)`` row-layout
        factor (any dtype or device; not modified). On an error nothing of this client stays
        in the file and the spill is as before."""
        start = self._count * self._client_bytes
        try:
            self._file.seek(start)
            for k in range(len(self.group.modules)):
                for which in (Factor.B, Factor.A):
                    block = rows[which][k].detach().to("cpu", SPILL_DTYPE).contiguous()
                    self._file.write(memoryview(block.numpy()).cast("B"))
            self._file.flush()
        except BaseException:
            self._file.truncate(start)
            raise
        self._count += 1

    def read_module(self, client: int, k: int, out: Tensor) -> tuple[Tensor, Tensor]:
        """Client ``client``'s module ``k`` into ``out`` (a contiguous CPU float32 tensor of
        :attr:`module_items` items): the ``(B^T (r, d_out), A (r, d_in))`` views of ``out``."""
        if not 0 <= client < self._count:
            raise IndexError(f"client {client} not in the spill ({self._count} held)")
        offset = client * self._client_bytes + k * self._module_items * 4
        target = memoryview(out.numpy()).cast("B")
        read = os.preadv(self._file.fileno(), [target], offset)
        if read != len(target):
            raise OSError(f"short read from the factor spill: {read} of {len(target)} bytes")
        g = self.group
        return out[: g.rank * g.d_out].view(g.rank, g.d_out), out[g.rank * g.d_out :].view(
            g.rank, g.d_in
        )

    def close(self) -> None:
        self._file.close()
        self._count = 0
