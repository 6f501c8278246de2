"""The simulator's held-out scores of a global adapter, as the server's evaluator computes them.

Texts: :func:`fedrot_client.evaluation.evaluate` (accuracy for classification, perplexity for a
causal LM). Instruction rows: :func:`fedrot_client.generation.evaluate_generation` (exact match
of the greedy answers, perplexity of the reference answers given their prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedrot_client.answers import extractor_named
from fedrot_client.evaluation import evaluate
from fedrot_client.generation import evaluate_generation
from fedrot_client.instructions import InstructionData, evaluation_examples
from fedrot_client.simulation.config import SimulationConfig
from fedrot_client.simulation.federated_data import ClientData


@dataclass(frozen=True)
class HeldOutScores:
    """``loss``: mean cross-entropy (per example for classification, per token otherwise);
    the other scores are None where the data has none."""

    loss: float
    accuracy: float | None = None
    perplexity: float | None = None
    exact_match: float | None = None


def score_held_out(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data: ClientData,
    config: SimulationConfig,
) -> HeldOutScores:
    """``model`` (the global adapter loaded) scored on ``data`` with ``config``'s batch size,
    ``max_length`` and, for instruction rows, ``max_new_tokens`` and ``extractor``."""
    if isinstance(data, InstructionData):
        result = evaluate_generation(
            model, tokenizer, evaluation_examples(data, tokenizer),
            extractor=extractor_named(config.extractor), max_new_tokens=config.max_new_tokens,
            batch_size=config.eval_batch_size, max_length=config.max_length,
        )  # fmt: skip
        return HeldOutScores(result.loss, perplexity=result.perplexity,
                             exact_match=result.exact_match)  # fmt: skip
    result = evaluate(model, tokenizer, data, batch_size=config.eval_batch_size,
                      max_length=config.max_length)  # fmt: skip
    return HeldOutScores(result.loss, result.accuracy, result.perplexity)
