"""The simulated clients' data: one pool of examples, a held-out split and label-Dirichlet shards.

The split is :func:`fedrot_client.partition.split_federated` (the one ``make demo``,
``python -m fedrot_client.wordnet`` and ``fedrot split`` use): ``eval_size`` random examples are
held out, the rest is divided by a label-Dirichlet(``alpha``) draw, and each shard is capped at
``per_client`` by a seeded uniform sample (so a client keeps its label mix while its size
shrinks). The pool is WordNet (:func:`wordnet_federation`: categories, glosses or
reverse-dictionary chats) or a user's file (:func:`file_federation`: classification, plain text
or instruction rows).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from fedrot_client.data import TextDataset
from fedrot_client.instructions import InstructionData, instruction_data
from fedrot_client.partition import label_skew, split_federated
from fedrot_client.user_data import UserData, UserFiles
from fedrot_client.wordnet import (
    DEFAULT_WORDNET_DIR,
    LEXNAMES,
    Synset,
    classification_record,
    generation_record,
    read_synsets,
    reverse_dictionary_record,
    reverse_dictionary_synsets,
)


ClientData = TextDataset | InstructionData
"""A client's examples: texts (with labels for classification; the simulator's own training
loop) or instruction rows (TRL's ``SFTTrainer``)."""


class WordNetTask(StrEnum):
    """What the simulator makes of WordNet: gloss -> lexicographer category (classification),
    ``"word: gloss"`` texts (causal LM), or reverse-dictionary chats (definition -> word;
    instruction tuning, as ``make demo-llm``)."""

    CATEGORIES = "categories"
    GLOSSES = "glosses"
    REVERSE_DICTIONARY = "reverse-dictionary"


@dataclass(frozen=True)
class FederatedData:
    """``clients[i]`` is client i's training data; ``evaluation`` the held-out set; ``skew`` the
    mean total-variation distance of the shards' label mix from the pool's (0 = IID)."""

    clients: tuple[ClientData, ...]
    evaluation: ClientData
    skew: float

    def __post_init__(self) -> None:
        if not self.clients:
            raise ValueError("a federation needs at least one client dataset")


def partition_dataset(
    pool: ClientData,
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
    task: WordNetTask = WordNetTask.CATEGORIES,
    directory: str | Path = DEFAULT_WORDNET_DIR,
) -> FederatedData:
    """WordNet as ``task`` (:class:`WordNetTask`), split by lexicographer category: gloss ->
    one of the 45 categories, ``"word: gloss"`` texts without labels, or reverse-dictionary
    chats over the common head words (the synsets ``make demo-llm`` asks about)."""
    synsets = _synsets(str(directory))
    task = WordNetTask(task)
    if task is WordNetTask.REVERSE_DICTIONARY:
        synsets = tuple(reverse_dictionary_synsets(synsets, directory))
    categories = np.array([s.lex_filenum for s in synsets], dtype=np.int64)
    pool: ClientData
    if task is WordNetTask.GLOSSES:
        pool = TextDataset(tuple(str(generation_record(s)["text"]) for s in synsets),
                           None, source="wordnet-generation")  # fmt: skip
    elif task is WordNetTask.REVERSE_DICTIONARY:
        pool = instruction_data((("wordnet", reverse_dictionary_record(s)) for s in synsets),
                                "wordnet-reverse-dictionary")  # fmt: skip
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
    by its label classes (causal-LM data without labels: by size alone); the held-out set is
    ``data.files[1]`` when given, else ``eval_size`` rows held out of the first file.
    Instruction rows (prompt/completion, chat, Alpaca) become :class:`InstructionData`."""
    train = data.files[0]
    pool = _examples(train)
    held_out = _examples(data.files[1]) if len(data.files) > 1 else None
    if held_out is not None and type(held_out) is not type(pool):
        raise ValueError(f"{data.files[1].source} holds {data.files[1].shape} rows, "
                         f"{train.source} {train.shape} rows: give held-out data of the same kind")
    federation = partition_dataset(
        pool, train.groups, num_clients, alpha=alpha, seed=seed,
        eval_size=0 if held_out is not None else eval_size, per_client=per_client,
        num_groups=data.num_groups,
    )  # fmt: skip
    if held_out is None:
        return federation
    return FederatedData(federation.clients, held_out, federation.skew)


def _examples(data: UserData) -> ClientData:
    examples = data.dataset if data.dataset is not None else data.instructions
    assert examples is not None, data.shape
    return examples
