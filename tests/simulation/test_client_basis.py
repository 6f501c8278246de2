"""Clients reporting in their own random basis: the model is unchanged, FedIT's average is not,
and FedRot-LoRA (lambda = 1) removes most of the error that causes."""

from __future__ import annotations

import statistics

import torch

from fedrot.adapters import BOTH_FACTORS, Adapter, Factor, LoraPair
from fedrot_client.simulation import run_simulation
from fedrot_client.simulation.client_basis import ClientBasis, report_in_basis
from simulation_fixtures import tiny_config


def _update(seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    lora = {f"m{k}": LoraPair(A=torch.randn(4, 12, generator=g), B=torch.randn(10, 4, generator=g))
            for k in range(3)}  # fmt: skip
    return Adapter(lora=lora, extra={"head.weight": torch.randn(2, 10, generator=g)})


def test_haar_basis_keeps_every_product_and_moves_the_factors() -> None:
    update = _update()
    reported = report_in_basis(update, ClientBasis.HAAR, BOTH_FACTORS, seed=7)
    for module, pair in update.lora.items():
        moved = reported.lora[module]
        torch.testing.assert_close(moved.B @ moved.A, pair.B @ pair.A, rtol=1e-5, atol=1e-5)
        assert (moved.A - pair.A).norm() > 0.1 * pair.A.norm()
        assert moved.A.dtype == pair.A.dtype
    assert reported.extra["head.weight"] is update.extra["head.weight"]
    again = report_in_basis(update, ClientBasis.HAAR, BOTH_FACTORS, seed=7)
    other = report_in_basis(update, ClientBasis.HAAR, BOTH_FACTORS, seed=8)
    assert torch.equal(again.lora["m0"].A, reported.lora["m0"].A)
    assert not torch.equal(other.lora["m0"].A, reported.lora["m0"].A)


def test_shared_basis_and_one_factor_rounds_report_the_update_as_trained() -> None:
    update = _update()
    assert report_in_basis(update, ClientBasis.SHARED, BOTH_FACTORS, seed=1) is update
    only_b = frozenset({Factor.B})
    assert report_in_basis(update, ClientBasis.HAAR, only_b, seed=1) is update


def test_fedrot_removes_most_of_the_error_of_clients_own_bases(federation) -> None:
    def later_errors(strategy: str, lam: float, basis: str) -> float:
        config = tiny_config(strategy=strategy, lam=lam, rounds=3, client_basis=basis)
        rounds = run_simulation(config, federation).rounds
        return statistics.fmean(r.relative_aggregation_error for r in rounds[1:])

    fedit = later_errors("fedit", 0.0, "haar")
    fedrot = later_errors("fedrot", 1.0, "haar")
    shared = later_errors("fedit", 0.0, "shared")
    assert fedit > 2 * shared  # the bases alone make FedIT's average worse
    assert fedrot < 0.5 * fedit
