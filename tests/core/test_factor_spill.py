"""The scratch file of a tracked round: what goes in comes back, bit for bit, and a failed write
leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedrot.adapters import Factor
from fedrot.factor_spill import FactorSpill
from fedrot.module_groups import ModuleGroup

GROUP = ModuleGroup(index=0, d_out=12, d_in=20, rank=3, modules=("a", "b", "c"))


def client_rows(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> dict:
    return {
        Factor.B: [torch.randn(3, 12, generator=gen).to(dtype) for _ in GROUP.modules],
        Factor.A: [torch.randn(3, 20, generator=gen).to(dtype) for _ in GROUP.modules],
    }


def test_every_module_of_every_client_reads_back_exactly(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    spill = FactorSpill(GROUP, tmp_path)
    clients = [client_rows(gen) for _ in range(4)]
    # a non-contiguous view (B^T of a B) and a float64 factor are written as float32 rows
    clients[1][Factor.B][2] = torch.randn(12, 3, generator=gen).mT
    clients[2][Factor.A][0] = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    for rows in clients:
        spill.append(rows)
    assert len(spill) == 4 and spill.nbytes() == 4 * 3 * 3 * (12 + 20) * 4
    out = torch.empty(spill.module_items)
    for i, rows in enumerate(clients):
        for k in range(3):
            Bt, A = spill.read_module(i, k, out)
            assert torch.equal(Bt, rows[Factor.B][k].float())
            assert torch.equal(A, rows[Factor.A][k].float())
    with pytest.raises(IndexError):
        spill.read_module(4, 0, out)
    assert list(tmp_path.iterdir()) == []
    spill.close()


def test_a_failed_append_leaves_the_earlier_clients_and_no_partial_record(
    tmp_path: Path,
) -> None:
    gen = torch.Generator().manual_seed(2)
    spill = FactorSpill(GROUP, tmp_path)
    first = client_rows(gen)
    spill.append(first)
    broken = client_rows(gen)
    broken[Factor.A][2] = "not a tensor"  # fails after two modules were written
    with pytest.raises(AttributeError):
        spill.append(broken)
    assert len(spill) == 1 and spill.nbytes() == 3 * 3 * 32 * 4
    second = client_rows(gen)
    spill.append(second)
    out = torch.empty(spill.module_items)
    Bt, A = spill.read_module(1, 2, out)
    assert torch.equal(Bt, second[Factor.B][2]) and torch.equal(A, second[Factor.A][2])
    Bt, A = spill.read_module(0, 0, out)
    assert torch.equal(A, first[Factor.A][0])
