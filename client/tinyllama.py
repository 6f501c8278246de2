"""A tiny, randomly initialised Llama and a character-level tokenizer, built offline.

The causal-LM twin of :mod:`fedrot_client.tinybert`, for fast tests and smoke runs: two
decoder layers of width 32 (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``,
``up_proj``, ``down_proj`` as in every Llama) over a vocabulary of the printable ASCII
characters plus ``<pad>``, ``<unk>``, ``<s>`` and ``</s>``. The tokenizer is a
``PreTrainedTokenizerFast`` (one token per character, lossless decoding) with a small ChatML
chat template, so chat data and TRL's trainers work with it. Weights come from
``torch.manual_seed(seed)``: every process that builds it with the same seed holds the same
base model.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)
CHARACTERS: str = string.printable  # letters, digits, punctuation, space, \t \n \r \x0b \x0c

HIDDEN_SIZE = 32
NUM_LAYERS = 2
NUM_HEADS = 2
INTERMEDIATE_SIZE = 64
MAX_POSITIONS = 512
INITIALIZER_RANGE = 0.2

# ChatML, as SmolLM2 and many instruction-tuned models use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def character_vocabulary() -> dict[str, int]:
    """Token -> id: the special tokens, then every printable character."""
    return {token: index for index, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ``decode(encode(text)) == text`` for printable ASCII."""
    core = Tokenizer(models.WordLevel(character_vocabulary(), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config() -> LlamaConfig:
    vocabulary = character_vocabulary()
    return LlamaConfig(
        vocab_size=len(vocabulary),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=INITIALIZER_RANGE,
        pad_token_id=vocabulary[PAD],
        bos_token_id=vocabulary[BOS],
        eos_token_id=vocabulary[EOS],
        tie_word_embeddings=False,
    )


def build_tiny_llama(seed: int) -> PreTrainedModel:
    """A ``LlamaForCausalLM`` with seeded random weights (float32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config())
