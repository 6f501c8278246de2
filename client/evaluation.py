"""Evaluation on a dataset: accuracy and loss (classification), perplexity (causal LM)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedrot_client.batches import IGNORE_INDEX, encode_batch
from fedrot_client.data import TextDataset
from fedrot_client.lora import task_of
from fedrot_client.models import TaskKind


@dataclass(frozen=True)
class EvaluationResult:
    """``loss`` is the mean cross-entropy per example (classification) or per predicted token
    (causal LM); ``accuracy`` is set for classification, ``perplexity = exp(loss)`` for causal LM.
    """

    num_samples: int
    loss: float
    accuracy: float | None = None
    perplexity: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return {"num_samples": self.num_samples, "loss": self.loss,
                "accuracy": self.accuracy, "perplexity": self.perplexity}  # fmt: skip


@torch.no_grad()
def evaluate(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
    *,
    batch_size: int = 64,
    max_length: int = 64,
    progress: bool = False,
) -> EvaluationResult:
    """Evaluate ``model`` (in eval mode, no dropout) on every example of ``dataset``, in order."""
    if len(dataset) == 0:
        raise ValueError(f"{dataset.source}: nothing to evaluate")
    task = task_of(model)
    device = next(model.parameters()).device
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="evaluation", disable=not progress):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        batch = encode_batch(tokenizer, dataset, indices, task, max_length, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if task is TaskKind.CLASSIFICATION:
            loss_sum += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
            correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
            count += len(indices)
        else:
            batch_loss, tokens = token_loss(logits, batch["labels"])
            loss_sum += batch_loss
            count += tokens
    loss = loss_sum / max(count, 1)
    if task is TaskKind.CLASSIFICATION:
        return EvaluationResult(len(dataset), loss, accuracy=correct / len(dataset))
    return EvaluationResult(len(dataset), loss, perplexity=math.exp(loss))


def token_loss(logits: Tensor, labels: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy and the number of predicted tokens.

    ``logits``: ``(batch, seq, vocab)``; ``labels``: ``(batch, seq)`` with ``IGNORE_INDEX``.
    """
    shifted_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(
        shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss.item(), int((shifted_labels != IGNORE_INDEX).sum())
