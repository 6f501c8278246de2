"""Tokenized model inputs for a batch of examples, and the seeded order batches are drawn in."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fedrot_client.data import TextDataset
from fedrot_client.errors import DataError
from fedrot_client.models import TaskKind

IGNORE_INDEX = -100  # label value the loss skips (padding)


def encode_batch(
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
    indices: Sequence[int],
    task: TaskKind,
    max_length: int,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Model inputs for ``dataset[indices]``, padded to the longest (at most ``max_length``).

    ``input_ids`` and ``attention_mask`` are ``(batch, seq)`` int64. ``labels`` is ``(batch,)``
    class ids for classification, or for a causal LM a copy of ``input_ids`` with padding set
    to ``IGNORE_INDEX`` (the model shifts it by one position itself).
    """
    texts = [dataset.texts[i] for i in indices]
    if task is TaskKind.CAUSAL_LM and tokenizer.eos_token:
        texts = [text + tokenizer.eos_token for text in texts]
    encoded = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if task is TaskKind.CLASSIFICATION:
        if dataset.labels is None:
            raise DataError(f"{dataset.source}: classification needs labels, the dataset has none")
        batch["labels"] = torch.tensor([dataset.labels[i] for i in indices], dtype=torch.long)
    else:
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
    return {name: tensor.to(device) for name, tensor in batch.items()}


def shuffled_batches(
    num_examples: int,
    batch_size: int,
    *,
    seed: int,
    steps: int | None = None,
    epochs: int | None = None,
) -> Iterator[list[int]]:
    """Index lists: ``steps`` batches or ``epochs`` passes over seeded permutations.

    Each pass is a fresh permutation from one ``torch.Generator`` seeded by ``seed``. With
    ``steps``, batches run across pass boundaries and are always full (or the whole dataset
    when it is smaller than ``batch_size``); with ``epochs`` the last batch may be short.
    """
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need examples and a batch size, got {num_examples}, {batch_size}")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    generator = torch.Generator().manual_seed(seed)
    if epochs is not None:
        order = torch.cat([torch.randperm(num_examples, generator=generator)
                           for _ in range(epochs)]).tolist()  # fmt: skip
        yield from (order[i : i + batch_size] for i in range(0, len(order), batch_size))
        return
    size = min(batch_size, num_examples)
    pending: list[int] = []
    for _ in range(steps or 0):
        while len(pending) < size:
            pending.extend(torch.randperm(num_examples, generator=generator).tolist())
        batch, pending = pending[:size], pending[size:]
        yield batch
