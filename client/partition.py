"""Label-skewed splits of a dataset across clients (pure numpy, seeded, no files).

``dirichlet_partition`` is the usual label-Dirichlet split of federated-learning papers (and
FedRot-LoRA's experiments): for every class, the class's examples are divided among the clients
by a multinomial draw with proportions from ``Dirichlet(alpha * 1_N)``. Small ``alpha`` gives
each client a few dominant classes; large ``alpha`` approaches an even (IID) split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

Indices = NDArray[np.int64]

MAX_ATTEMPTS = 1000


def dirichlet_partition(
    labels: ArrayLike,
    num_clients: int,
    alpha: float = 0.5,
    seed: int = 0,
    *,
    min_size: int = 1,
) -> list[Indices]:
    """Split ``range(len(labels))`` into ``num_clients`` disjoint, sorted index arrays.

    ``labels``: 1-D integer class ids, shape ``(n,)``. Every index lands in exactly one shard.
    The draw is redone (with the same generator, so still deterministic per ``seed``) until every
    shard holds at least ``min_size`` examples; ``ValueError`` after ``MAX_ATTEMPTS`` tries or
    when ``n < num_clients * min_size``.
    """
    label_array = np.asarray(labels)
    if label_array.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {label_array.shape}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if len(label_array) < num_clients * min_size:
        raise ValueError(
            f"{len(label_array)} examples cannot give {num_clients} clients {min_size} each"
        )
    rng = np.random.default_rng(seed)
    for _ in range(MAX_ATTEMPTS):
        shards = _draw_shards(label_array, num_clients, alpha, rng)
        if min(len(shard) for shard in shards) >= min_size:
            return shards
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {len(label_array)} examples gave all "
        f"{num_clients} clients at least {min_size} examples in {MAX_ATTEMPTS} draws (a larger "
        "alpha or fewer clients spreads each class further)"
    )


def _draw_shards(
    labels: NDArray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[Indices]:
    """One draw: each class's shuffled members go to the clients in multinomial counts of
    ``Dirichlet(alpha)`` shares, so every client's expected count is its share (flooring the
    cumulative shares instead would give the last client every class's rounding surplus)."""
    pieces: list[list[Indices]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        counts = rng.multinomial(len(members), shares / shares.sum())
        for client, part in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            pieces[client].append(part)
    return [np.sort(np.concatenate(parts)).astype(np.int64) for parts in pieces]


def label_histograms(labels: ArrayLike, shards: Sequence[Indices], num_labels: int) -> NDArray:
    """Counts per client and class, shape ``(len(shards), num_labels)``, int64."""
    label_array = np.asarray(labels)
    return np.stack(
        [np.bincount(label_array[shard], minlength=num_labels) for shard in shards]
    ).astype(np.int64)


def label_skew(labels: ArrayLike, shards: Sequence[Indices], num_labels: int) -> float:
    """Mean total-variation distance between each shard's label distribution and the overall one.

    0 for a perfectly IID split; approaches 1 as shards hold disjoint classes.
    """
    counts = label_histograms(labels, shards, num_labels).astype(np.float64)
    overall = counts.sum(axis=0) / counts.sum()
    per_client = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    return float(0.5 * np.abs(per_client - overall).sum(axis=1).mean())


@dataclass(frozen=True)
class FederatedSplit:
    """Index arrays into one pool of examples: a held-out evaluation set and one per client."""

    evaluation: Indices
    clients: tuple[Indices, ...]


def split_federated(
    labels: ArrayLike,
    num_clients: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    eval_size: int = 0,
    max_per_client: int | None = None,
    min_size: int = 1,
) -> FederatedSplit:
    """Hold out ``eval_size`` random examples, Dirichlet-split the rest, then cap each client.

    The cap keeps a seeded uniform sample of each shard, so a client's label mix is kept while
    its size shrinks. All arrays are sorted int64 indices into ``labels``; none overlap.
    """
    label_array = np.asarray(labels)
    if not 0 <= eval_size < len(label_array):
        raise ValueError(f"eval_size {eval_size} must be in 0..{len(label_array) - 1}")
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(len(label_array))
    held_out, pool = np.sort(order[:eval_size]), np.sort(order[eval_size:])
    shards = dirichlet_partition(
        label_array[pool], num_clients, alpha, seed, min_size=min_size
    )
    clients = tuple(_cap(pool[shard], max_per_client, rng) for shard in shards)
    return FederatedSplit(evaluation=held_out.astype(np.int64), clients=clients)


def _cap(indices: Indices, limit: int | None, rng: np.random.Generator) -> Indices:
    if limit is None or len(indices) <= limit:
        return indices
    return np.sort(rng.choice(indices, size=limit, replace=False)).astype(np.int64)
