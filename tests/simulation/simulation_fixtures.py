"""Builders for the simulation tests: a tiny seeded BERT config and a small three-class text pool,
and for instruction tuning a tiny Llama config and a pool of chats."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from fedrot_client.data import TextDataset
from fedrot_client.instructions import InstructionData, Shape
from fedrot_client.lora import LoraSpec
from fedrot_client.models import ModelSpec, TaskKind
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


def chat_federation(num_clients: int = 3, *, alpha: float = 0.5, seed: int = 0) -> FederatedData:
    """Chats whose answer is a word of the question's class, split by that class."""
    _, labels = text_pool()
    rows = tuple({"prompt": [{"role": "user", "content": f"a word like {WORDS[c][0]}?"}],
                  "completion": [{"role": "assistant", "content": WORDS[c][1 + i % 3]}]}
                 for i, c in enumerate(labels))  # fmt: skip
    pool = InstructionData(rows, Shape.CHAT, "chats")
    return partition_dataset(pool, labels, num_clients, alpha=alpha, seed=seed, eval_size=6,
                             per_client=12, num_groups=3)  # fmt: skip


def tiny_instruction_config(**changes) -> SimulationConfig:
    config = SimulationConfig(
        model=ModelSpec("tiny-llama", task=TaskKind.CAUSAL_LM, seed=0),
        lora=LoraSpec(r=2, alpha=4.0, dropout=0.0, target_modules=("q_proj", "v_proj")),
        strategy="fedrot", lam=0.4, num_clients=3, rounds=2, local_steps=2, batch_size=4,
        lr=0.05, optimizer="adamw", max_length=128, max_new_tokens=4, eval_batch_size=6, seed=0,
        num_threads=1,
    )  # fmt: skip
    return replace(config, **changes)
