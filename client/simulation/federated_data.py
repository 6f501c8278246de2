"""The simulated clients' data: one pool of examples, a held-out split and label-Dirichlet shards.

The split is :func:`fedrot_client.partition.split_federated` (the one ``make demo``,
``python -m fedrot_client.wordnet`` and ``fedrot split`` use): ``eval_size`` random examples are
held out, the rest is divided by a label-Dirichlet(``alpha``) draw, and each shard is capped at
``per_client`` by a seeded uniform sample (so a client keeps its label mix while its size
shrinks). The pool is WordNet's glosses (:func:`wordnet_federation`) or a user's file
(:func:`file_federation`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrot_client.data import TextDataset
from fedrot_client.partition import label_skew, split_federated
from fedrot_client.user_data import UserFiles
from fedrot_client.wordnet import (
    DEFAULT_WORDNET_DIR,
    LEXNAMES,
    Synset,
    classification_record,
    generation_record,
    read_synsets,
)


@dataclass(frozen=True)
class FederatedData:
    """``clients[i]`` is client i's training data; ``evaluation`` the held-out set; ``skew`` the
    mean total-variation distance of the shards' label mix from the pool's (0 = IID)."""

    clients: tuple[TextDataset, ...]
    evaluation: TextDataset
    skew: float

    def __post_init__(self) -> None:
        if not self.clients:
            raise ValueError("a federation needs at least one client dataset")


def partition_dataset(
    pool: TextDataset,
    group_labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    eval_size: int,
    per_client: int | None,
    num_groups: int,
) -> FederatedData:
    """Split ``pool`` by the classes in ``group_labels`` (``(len(pool),)`` int) across clients.

    For classification ``group_labels`` are the labels; for causal-LM data any class of the
    example (WordNet: the lexicographer category) makes the split label-skewed.
    """
    split = split_federated(
        group_labels, num_clients, alpha=alpha, seed=seed, eval_size=eval_size,
        max_per_client=per_client,
    )  # fmt: skip
    order = np.random.default_rng([seed, 2])
    clients = tuple(pool.subset(order.permutation(shard)) for shard in split.clients)
    skew = label_skew(group_labels, list(split.clients), num_groups)
    return FederatedData(clients, pool.subset(split.evaluation), skew)


@functools.lru_cache(maxsize=2)
def _synsets(directory: str) -> tuple[Synset, ...]:
    return tuple(read_synsets(directory))


def wordnet_federation(
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    eval_size: int,
    per_client: int | None,
    generative: bool = False,
    directory: str | Path = DEFAULT_WORDNET_DIR,
) -> FederatedData:
    """WordNet glosses: gloss -> one of the 45 lexicographer categories (classification), or
    ``"word: gloss"`` texts without labels for causal-LM training (``generative``)."""
    synsets = _synsets(str(directory))
    categories = np.array([s.lex_filenum for s in synsets], dtype=np.int64)
    if generative:
        pool = TextDataset(tuple(str(generation_record(s)["text"]) for s in synsets),
                           None, source="wordnet-generation")  # fmt: skip
    else:
        pool = TextDataset(tuple(str(classification_record(s)["text"]) for s in synsets),
                           tuple(int(c) for c in categories), source="wordnet")  # fmt: skip
    return partition_dataset(
        pool, categories, num_clients, alpha=alpha, seed=seed, eval_size=eval_size,
        per_client=per_client, num_groups=len(LEXNAMES),
    )  # fmt: skip


def file_federation(
    data: UserFiles,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    eval_size: int,
    per_client: int | None,
) -> FederatedData:
    """A user's data (:func:`fedrot_client.user_data.load_user_files`): ``data.files[0]`` split
    by its label classes (causal-LM text without labels: by size alone); the held-out set is
    ``data.files[1]`` when given, else ``eval_size`` rows held out of the first file."""
    train = data.files[0]
    if train.dataset is None:
        raise ValueError(f"{train.source}: {train.shape} rows are instruction data; the "
                         "simulator trains a causal LM on plain text only")  # fmt: skip
    held_out = data.files[1].dataset if len(data.files) > 1 else None
    federation = partition_dataset(
        train.dataset, train.groups, num_clients, alpha=alpha, seed=seed,
        eval_size=0 if held_out is not None else eval_size, per_client=per_client,
        num_groups=data.num_groups,
    )  # fmt: skip
    if held_out is None:
        return federation
    return FederatedData(federation.clients, held_out, federation.skew)
