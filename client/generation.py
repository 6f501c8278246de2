"""Generation-based evaluation of an instruction-tuned causal LM: exact match and perplexity.

Each :class:`InstructionExample` is scored twice: its prompt is completed greedily and the
answer in the completion compared with the reference's (:mod:`fedrot_client.answers`), and the
reference's tokens (plus EOS) are scored after the prompt (completion-only perplexity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedrot_client.answers import Extractor, answers_match
from fedrot_client.batches import IGNORE_INDEX
from fedrot_client.evaluation import token_loss


@dataclass(frozen=True)
class InstructionExample:
    """``prompt``: rendered text (chat template already applied); ``reference``: the expected
    completion."""

    prompt: str
    reference: str


@dataclass(frozen=True)
class GenerationResult:
    """``exact_match``: fraction of examples whose greedy completion holds the reference's
    answer; ``loss``: mean cross-entropy per completion token; ``perplexity = exp(loss)``;
    ``predictions``: the greedy completions, in example order."""

    num_samples: int
    exact_match: float
    perplexity: float
    loss: float
    predictions: tuple[str, ...]

    def to_dict(self) -> dict[str, float | int]:
        return {"num_samples": self.num_samples, "exact_match": self.exact_match,
                "perplexity": self.perplexity, "loss": self.loss}  # fmt: skip


@torch.no_grad()
def evaluate_generation(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[InstructionExample],
    *,
    extractor: Extractor,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = False,
) -> GenerationResult:
    """Score ``model`` (left in eval mode) on ``examples``, ``batch_size`` at a time.

    Generation is greedy, at most ``max_new_tokens`` per prompt, stopping at EOS; prompts
    longer than ``max_length`` tokens keep their last ``max_length``. The perplexity pass
    scores prompt + reference + EOS cut to its first ``max_length`` tokens. Neither pass
    changes ``tokenizer`` (padding is done here: left for generation, right for scoring).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("no instruction examples to evaluate")
    if batch_size < 1 or max_new_tokens < 1 or max_length < 1:
        raise ValueError(f"batch_size, max_new_tokens and max_length must be >= 1, got "
                         f"{batch_size}, {max_new_tokens}, {max_length}")  # fmt: skip
    pad_id = padding_id(tokenizer)
    device = next(model.parameters()).device
    model.eval()
    predictions: list[str] = []
    loss_sum, count = 0.0, 0
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="generation", disable=not progress):
        batch = examples[start : start + batch_size]
        prompts = [_prompt_ids(tokenizer, e.prompt)[-max_length:] for e in batch]
        predictions += _generate(model, tokenizer, prompts, max_new_tokens, pad_id, device)
        scored = encode_completions(tokenizer, batch, max_length, pad_id)
        logits = model(input_ids=scored["input_ids"].to(device),
                       attention_mask=scored["attention_mask"].to(device)).logits  # fmt: skip
        batch_loss, tokens = token_loss(logits, scored["labels"].to(device))
        loss_sum, count = loss_sum + batch_loss, count + tokens
    if count == 0:
        raise ValueError(f"max_length={max_length} leaves no completion token to score")
    loss = loss_sum / count
    hits = sum(answers_match(p, e.reference, extractor) for p, e in zip(predictions, examples))
    return GenerationResult(len(examples), hits / len(examples), math.exp(loss), loss,
                            tuple(predictions))  # fmt: skip


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad token's id, or EOS's when the tokenizer has no pad token (decoders often)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token")
    return pad_id


def encode_completions(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[InstructionExample],
    max_length: int,
    pad_id: int,
) -> dict[str, Tensor]:
    """Prompt + reference + EOS per example, cut to the first ``max_length`` tokens, right-padded.

    ``input_ids``, ``attention_mask`` and ``labels`` are ``(batch, seq)`` int64 on the CPU;
    ``labels`` copies the reference and EOS tokens and is ``IGNORE_INDEX`` on the prompt and
    the padding (unshifted: :func:`fedrot_client.evaluation.token_loss` shifts).
    """
    eos = tokenizer.eos_token or ""
    rows: list[tuple[list[int], list[int]]] = []
    for example in examples:
        prompt = _prompt_ids(tokenizer, example.prompt)
        completion = tokenizer(example.reference + eos, add_special_tokens=False)["input_ids"]
        ids = (prompt + completion)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    return {
        "input_ids": _tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": _tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": _tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels in rows]),
    }


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask``, ``(batch, longest)`` int64, padded on the left."""
    width = max(len(ids) for ids in prompts)
    return {
        "input_ids": _tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in prompts]),
        "attention_mask": _tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts]),
    }


def _generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    device: torch.device,
) -> list[str]:
    """Greedy completions of ``prompts`` (token ids), decoded up to the first EOS."""
    inputs = {name: t.to(device) for name, t in left_padded(prompts, pad_id).items()}
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
    return [tokenizer.decode(_up_to_eos(ids, tokenizer.eos_token_id), skip_special_tokens=True)
            for ids in new_tokens]  # fmt: skip


def _up_to_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


def _tensor(rows: list[list[int]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.long)
