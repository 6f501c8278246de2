"""A tiny, randomly initialised BERT and a character-level WordPiece tokenizer, built offline.

For fast tests and smoke runs: two layers of width 32 and a vocabulary of 141 entries
(special tokens, characters, and each character as a ``##`` continuation), so any lowercase
English text tokenizes without unknown tokens. Weights come from ``torch.manual_seed(seed)``,
so every process that builds it with the same seed holds the same base model.
"""

from __future__ import annotations

import string

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    PreTrainedModel,
)

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CHARACTERS: str = string.ascii_lowercase + string.digits + string.punctuation

HIDDEN_SIZE = 32
NUM_LAYERS = 2
NUM_HEADS = 2
INTERMEDIATE_SIZE = 64
MAX_POSITIONS = 256
# Wider than BERT's 0.02, so that a random 2-layer model still tells short texts apart.
INITIALIZER_RANGE = 0.2


def character_vocabulary() -> dict[str, int]:
    """Token -> id: the special tokens, every character, then every ``##`` character."""
    tokens = [*SPECIAL_TOKENS, *CHARACTERS, *(f"##{c}" for c in CHARACTERS)]
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer() -> BertTokenizer:
    """A lower-casing BERT WordPiece tokenizer over :func:`character_vocabulary`."""
    return BertTokenizer(vocab=character_vocabulary(), do_lower_case=True, model_max_length=512)


def tiny_bert_config(num_labels: int) -> BertConfig:
    return BertConfig(
        vocab_size=len(character_vocabulary()),
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        intermediate_size=INTERMEDIATE_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        num_labels=num_labels,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=INITIALIZER_RANGE,
    )


def build_tiny_bert(num_labels: int, seed: int) -> PreTrainedModel:
    """A ``BertForSequenceClassification`` with seeded random weights (float32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForSequenceClassification(tiny_bert_config(num_labels))
