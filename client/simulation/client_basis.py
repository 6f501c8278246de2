"""The basis a simulated client reports its LoRA factors in.

A LoRA update is only defined up to a gauge: ``(B R, R^T A)`` is the same model as ``(B, A)``
for any rotation ``R``. Clients that start every round from the broadcast adapter and train a
few steps stay close to its basis, so their factors barely disagree (docs/results.md). A
client is free to report any basis, though (a different optimiser state, a re-orthogonalised
factorisation, another implementation), and FedIT averages whatever it gets. ``HAAR`` makes
that explicit: each client re-expresses its trained pair in a Haar-random basis of its own
(seeded per run, round and client) before uploading, which changes nothing about its model
and everything about plain factor averaging. It is a stress test of the mechanism FedRot-LoRA
corrects, not a model of any particular deployment.
"""

from __future__ import annotations

from enum import StrEnum

import torch

from fedrot.adapters import BOTH_FACTORS, Adapter, Factor, LoraPair
from fedrot.alignment import rotate_factors, sample_haar_rotation


class ClientBasis(StrEnum):
    """``shared``: factors as trained; ``haar``: each client's own random basis per round."""

    SHARED = "shared"
    HAAR = "haar"


def report_in_basis(
    update: Adapter, basis: ClientBasis, trained: frozenset[Factor], seed: int
) -> Adapter:
    """``update`` as the client reports it. With ``HAAR`` and both factors trained, every
    module's pair becomes ``(B R, R^T A)`` with ``R`` Haar on SO(r) drawn from ``seed``
    (``B A`` kept to float rounding); a round that trains one factor only (FFA-LoRA, RoLoRA)
    keeps the update as it is, since rotating one factor alone would change the model."""
    if basis is ClientBasis.SHARED or trained != BOTH_FACTORS:
        return update
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for module, pair in update.lora.items():
        rotation = sample_haar_rotation(1, pair.rank, generator)
        A, B = rotate_factors(pair.A[None], pair.B[None], rotation)
        lora[module] = LoraPair(A=A[0].to(pair.A.dtype), B=B[0].to(pair.B.dtype))
    return Adapter(lora=lora, extra=update.extra)
