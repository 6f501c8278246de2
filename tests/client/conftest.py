"""Fixtures of the client tests: a tiny seeded BERT with LoRA, and a tiny learnable dataset."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from fedrot_client.data import TextDataset
from fedrot_client.lora import LoraSpec, attach_lora
from fedrot_client.models import ModelSpec, load_base_model
from federation_fake import RunningFake, Script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY = ModelSpec("tiny-bert", num_labels=2, seed=0)
TINY_LORA = LoraSpec(r=2, alpha=4.0, dropout=0.0)


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return TINY


@pytest.fixture
def tiny_lora() -> LoraSpec:
    return TINY_LORA


@pytest.fixture
def tiny_model() -> Callable:
    """A factory: ``tiny_model(seed=1)`` -> (PEFT model, tokenizer), fresh each call."""

    def build(seed: int = 1, spec: ModelSpec = TINY, lora: LoraSpec = TINY_LORA):
        base = load_base_model(spec)
        return attach_lora(base, lora, seed), base.tokenizer

    return build


@pytest.fixture
def sentiment() -> TextDataset:
    """24 short texts whose label is decided by their words (learnable in a few steps)."""
    positive = ["good fine great", "nice good day", "great fine nice", "a good one"]
    negative = ["bad awful poor", "sad bad day", "poor awful sad", "a bad one"]
    texts = tuple(positive * 3 + negative * 3)
    labels = tuple([1] * 12 + [0] * 12)
    return TextDataset(texts, labels, source="sentiment")


@pytest.fixture
def start_fake():
    """A factory: ``start_fake(rounds=2, ...)`` -> a started scripted FederationService
    (:mod:`federation_fake`) on port 0, stopped after the test."""
    started: list[RunningFake] = []

    def start(**script: object) -> RunningFake:
        started.append(RunningFake(Script(**script)))
        return started[-1]

    yield start
    for fake in started:
        fake.stop()
