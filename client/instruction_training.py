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
import math
import random
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from fedrot.adapters import Factor
from fedrot_client import hf
from fedrot_client.errors import DataError, TrainingDiverged
from fedrot_client.instructions import InstructionData
from fedrot_client.lora import export_adapter, set_trainable_factors
from fedrot_client.training import TrainConfig, TrainResult


def sft_trainer(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    args: TrainingArguments,
    source: str,
    *,
    max_length_name: str = "max_length",
) -> Any:
    """TRL's ``SFTTrainer`` over ``dataset`` (a ``datasets.Dataset`` of TRL rows, from
    :meth:`InstructionData.to_dataset`); a one-line :class:`DataError` naming ``source`` and
    the setting ``max_length_name`` when truncation left no example with an answer token."""
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer)  # fmt: skip
    if len(trainer.train_dataset) == 0:
        raise DataError(f"{source}: no example keeps an answer token within "
                        f"{max_length_name} = {args.max_length} tokens")  # fmt: skip
    return trainer


def train_instructions(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data: InstructionData,
    trained: frozenset[Factor],
    config: TrainConfig,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``config``'s steps with ``SFTTrainer``, on the
    model's own device; only the ``trained`` factors (and a head, if any) change. The trainer
    seeds batches and dropout with ``config.seed``; the global random states (Python, NumPy,
    torch) are restored afterwards, as :func:`~fedrot_client.training.train_locally` does.
    ``num_samples`` is the examples the trainer went through (the aggregation weight),
    ``mean_loss`` its mean loss per optimiser step. A non-finite loss raises
    :class:`~fedrot_client.errors.TrainingDiverged`."""
    from trl import SFTConfig

    if not trained:
        raise ValueError("trained must name at least one factor")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    on_cpu = next(model.parameters()).device.type == "cpu"
    with (tempfile.TemporaryDirectory(prefix="fedrot-sft-") as scratch,
          _quiet(not config.progress), _restored_random_state()):  # fmt: skip
        args = hf.arguments_for(config, scratch, args_class=SFTConfig, use_cpu=on_cpu,
                                disable_tqdm=not config.progress, logging_strategy="no",
                                logging_nan_inf_filter=False)  # a NaN loss stays NaN  # fmt: skip
        trainer = sft_trainer(model, tokenizer, data.to_dataset(), args, data.source)
        if not config.progress:
            trainer.remove_callback(PrinterCallback)  # the end-of-training metrics dict
        set_trainable_factors(trainer.model, frozenset(trained))
        output = trainer.train()
    model.eval()
    tensors = export_adapter(model, frozenset(trained))
    if not math.isfinite(output.training_loss) or not all(
        bool(torch.isfinite(t).all()) for t in tensors.values()
    ):
        raise TrainingDiverged(f"training loss is {output.training_loss} after "
                               f"{trainer.state.global_step} steps; the update is not finite")
    return TrainResult(
        tensors=tensors,
        trained=frozenset(trained),
        num_samples=hf.samples_trained(trainer),
        mean_loss=float(output.training_loss),
        steps=trainer.state.global_step,
    )


@contextlib.contextmanager
def _restored_random_state() -> Iterator[None]:
    """Python's, NumPy's and torch's global random states as they were (the trainer seeds
    them all)."""
    python, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


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
