"""Where each simulated client's local training starts from, and what its update weighs.

By default every sampled client loads the round's broadcast adapter, trains, and its update
weighs ``n_i`` (samples processed). Two departures from that, both off by default:

``ClientInit.INDEPENDENT`` (round 0 only): each client starts from LoRA factors of its own, drawn
the way PEFT initialises a fresh adapter (``A`` Kaiming-uniform with ``a = sqrt(5)``, ``B`` zero)
from a seed of (run seed, client index), instead of the broadcast initial adapter. The head
and every other extra tensor still come from the broadcast. The round-0 reference (what the
server aligns to and measures the error against) is still the broadcast initial adapter.
From round 1 on every client starts from the aggregate, as usual: this is the case of
merging adapters trained apart, once, then federating. FedRot-LoRA never aligns round 0
(ALGORITHM.md §2: ``B_ref`` is zero there), so the round-0 merge is FedIT's for every lambda.

Stale updates (``stale_fraction > 0``): in every round ``t >= 1`` a seeded share of the
round's participants report an update trained from round ``t - 1``'s broadcast adapter
instead of round ``t``'s, as a slow client's late upload reaches a server run with
``late_updates = "stale"``. The server's rule (``fedrot_server.runs.ledger``) is followed: such an
update is completed and aligned against the *current* reference like any other, by the same
streaming aggregator, and weighs ``n_i * staleness_weight ** 1`` (one round late). As on the
server, a round whose trained factors differ from the previous round's takes no stale update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from torch import Tensor

from fedrot.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, Factor
from fedrot_client.simulation.backends import ClientJob, TrainingBackend
from fedrot_client.training import TrainResult


class ClientInit(StrEnum):
    """``shared``: round 0 starts from the broadcast adapter; ``independent``: from the
    client's own freshly drawn LoRA factors."""

    SHARED = "shared"
    INDEPENDENT = "independent"


@dataclass(frozen=True)
class ClientStart:
    """One participant's round: the adapter it loads (PEFT keys) and how many rounds late its
    update arrives (0, or 1 for a stale one)."""

    tensors: Mapping[str, Tensor]
    rounds_late: int = 0

    @property
    def stale(self) -> bool:
        return self.rounds_late > 0


def init_seed(seed: int, client_index: int) -> int:
    """The seed of client ``client_index``'s own initial LoRA factors (independent init)."""
    return (seed * 1_000_003 + 7_919 * (client_index + 1) + 17) % (2**31 - 1)


def independent_adapter(broadcast: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """``broadcast`` with every ``lora_A`` redrawn Kaiming-uniform (``a = sqrt(5)``, PEFT's
    init; ``(r, d_in)``, float32) from ``seed`` and every ``lora_B`` zero; other keys kept.
    Modules are drawn in sorted key order, so the result depends only on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(broadcast)
    for key in sorted(broadcast):
        if key.endswith(LORA_A_SUFFIX):
            fresh = torch.empty_like(broadcast[key], dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            out[key] = fresh.to(broadcast[key].dtype)
        elif key.endswith(LORA_B_SUFFIX):
            out[key] = torch.zeros_like(broadcast[key])
    return out


def stale_participants(
    seed: int, round_index: int, participants: Sequence[int], fraction: float
) -> set[int]:
    """The seeded ``round(fraction * len(participants))`` participants (at least one when
    ``fraction > 0``) whose update in round ``round_index`` is one round stale; none in round 0."""
    if fraction <= 0.0 or round_index == 0 or not participants:
        return set()
    count = min(len(participants), max(1, round(fraction * len(participants))))
    rng = np.random.default_rng([seed, 5, round_index])
    return {int(i) for i in rng.choice(sorted(participants), size=count, replace=False)}


def plan_starts(
    *,
    seed: int,
    round_index: int,
    participants: Sequence[int],
    client_init: ClientInit,
    stale_fraction: float,
    broadcast: Mapping[str, Tensor],
    previous: Mapping[str, Tensor] | None,
    same_factors_as_previous: bool,
) -> list[ClientStart]:
    """Each participant's start, in ``participants`` order. ``broadcast``: this round's
    global adapter; ``previous``: round ``round_index - 1``'s (None in round 0);
    ``same_factors_as_previous``: whether both rounds train the same factors (else no update
    is stale, as the server would refuse it)."""
    stale: set[int] = set()
    if previous is not None and same_factors_as_previous:
        stale = stale_participants(seed, round_index, participants, stale_fraction)
    starts = []
    for client in participants:
        if client in stale:
            starts.append(ClientStart(previous, rounds_late=1))
        elif round_index == 0 and client_init is ClientInit.INDEPENDENT:
            starts.append(ClientStart(independent_adapter(broadcast, init_seed(seed, client))))
        else:
            starts.append(ClientStart(broadcast))
    return starts


def train_from_starts(
    backend: TrainingBackend,
    starts: Sequence[ClientStart],
    trained: frozenset[Factor],
    jobs: Sequence[ClientJob],
) -> list[TrainResult]:
    """The backend's round for each distinct start (jobs sharing a start train together);
    results in job order."""
    groups: dict[int, list[int]] = {}
    for position, start in enumerate(starts):
        groups.setdefault(id(start.tensors), []).append(position)
    results: list[TrainResult | None] = [None] * len(jobs)
    for positions in groups.values():
        group_jobs = [jobs[p] for p in positions]
        trained_group = backend.train_round(starts[positions[0]].tensors, trained, group_jobs)
        for position, result in zip(positions, trained_group, strict=True):
            results[position] = result
    return [r for r in results if r is not None]
