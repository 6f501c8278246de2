"""Builders for the simulation tests: a tiny seeded BERT config and a small three-class text pool."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from fedrot_client.data import TextDataset
from fedrot_client.lora import LoraSpec
from fedrot_client.models import ModelSpec
from fedrot_client.simulation import FederatedData, SimulationConfig, partition_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (("good", "fine", "great", "nice"), ("bad", "awful", "poor", "sad"),
         ("red", "blue", "green", "pink"))  # fmt: skip


def text_pool(size: int = 90, seed: int = 0) -> tuple[TextDataset, np.ndarray]:
    """``size`` short texts of three classes, each written with its class's words."""
    rng = np.random.default_rng(seed)
    labels = np.arange(size, dtype=np.int64) % 3
    texts = tuple(" ".join(rng.choice(WORDS[c], size=3)) for c in labels)
    return TextDataset(texts, tuple(int(c) for c in labels), source="pool"), labels


def tiny_federation(num_clients: int = 3, *, alpha: float = 0.5, seed: int = 0) -> FederatedData:
    pool, labels = text_pool()
    return partition_dataset(pool, labels, num_clients, alpha=alpha, seed=seed, eval_size=15,
                             per_client=20, num_groups=3)  # fmt: skip


def tiny_config(**changes) -> SimulationConfig:
    config = SimulationConfig(
        model=ModelSpec("tiny-bert", num_labels=3, seed=0),
        lora=LoraSpec(r=2, alpha=4.0, dropout=0.1),
        strategy="fedrot", lam=0.4, num_clients=3, rounds=2, local_steps=3, batch_size=4,
        lr=0.2, max_length=16, eval_batch_size=8, seed=0, num_threads=1,
    )  # fmt: skip
    return replace(config, **changes)
