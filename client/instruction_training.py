"""One round of instruction tuning with TRL's ``SFTTrainer`` (completion-only loss, chat
templates; see :mod:`fedrot_client.instructions` for the data shapes).

The daemon's :class:`~fedrot_client.trainers.InstructionTrainer` and the simulator's clients
(:mod:`fedrot_client.simulation.backends`) both build their trainer with :func:`sft_trainer`;
:func:`train_instructions` is the simulator's round: the counterpart of
:func:`fedrot_client.training.train_locally` for instruction data, returning the same
:class:`~fedrot_client.training.TrainResult`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from fedrot.adapters import Factor
from fedrot_client import hf
from fedrot_client.errors import DataError
from fedrot_client.instructions import InstructionData
from fedrot_client.lora import export_adapter, set_trainable_factors
from fedrot_client.training import TrainConfig, TrainResult


def sft_trainer(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    args: TrainingArguments,
    source: str,
) -> Any:
    """TRL's ``SFTTrainer`` over ``dataset`` (a ``datasets.Dataset`` of TRL rows, from
    :meth:`InstructionData.to_dataset`); a one-line :class:`DataError` naming ``source`` when
    truncation to ``max_length`` left no example with an answer token."""
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer)  # fmt: skip
    if len(trainer.train_dataset) == 0:
        raise DataError(f"{source}: no example keeps an answer token within "
                        f"max_length = {args.max_length} tokens")  # fmt: skip
    return trainer


def train_instructions(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data: InstructionData,
    trained: frozenset[Factor],
    config: TrainConfig,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``config``'s steps with ``SFTTrainer``; only
    the ``trained`` factors (and a head, if any) change. The trainer seeds batches and dropout
    with ``config.seed``; ``num_samples`` is the examples it went through (the aggregation
    weight), ``mean_loss`` the trainer's mean training loss."""
    from trl import SFTConfig

    if not trained:
        raise ValueError("trained must name at least one factor")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    with tempfile.TemporaryDirectory(prefix="fedrot-sft-") as scratch, _quiet(not config.progress):
        args = hf.arguments_for(config, scratch, args_class=SFTConfig,
                                disable_tqdm=not config.progress, logging_strategy="no")  # fmt: skip
        trainer = sft_trainer(model, tokenizer, data.to_dataset(), args, data.source)
        if not config.progress:
            trainer.remove_callback(PrinterCallback)  # the end-of-training metrics dict
        set_trainable_factors(trainer.model, frozenset(trained))
        output = trainer.train()
    model.eval()
    return TrainResult(
        tensors=export_adapter(model, frozenset(trained)),
        trained=frozenset(trained),
        num_samples=hf.samples_trained(trainer),
        mean_loss=float(output.training_loss),
        steps=trainer.state.global_step,
    )


@contextlib.contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """No ``datasets`` progress bars (TRL tokenises the rows every round) while ``quiet``."""
    from datasets.utils import logging as datasets_logging

    if not quiet or not datasets_logging.is_progress_bar_enabled():
        yield
        return
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        datasets_logging.enable_progress_bar()
