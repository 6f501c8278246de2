"""The daemon's built-in trainers, one per task kind, each a plain user of the SDK.

A :class:`RoundTrainer` works one :class:`~fedrot_client.task.Task`: load the round's adapter,
train, submit (or withdraw). :class:`LocalLoopTrainer` runs
:func:`fedrot_client.training.train_locally`; :class:`InstructionTrainer` runs TRL's
``SFTTrainer`` through :mod:`fedrot_client.hf` on instruction data (completion-only loss, chat
templates), the way a user's own script would.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from typing import Protocol

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedrot.errors import SchemaError
from fedrot_client import hf
from fedrot_client.data import TextDataset
from fedrot_client.errors import RoundLostError, Stopped, TrainingDiverged
from fedrot_client.instruction_training import sft_trainer
from fedrot_client.instructions import InstructionData
from fedrot_client.task import Task
from fedrot_client.training import TrainConfig, train_locally

logger = logging.getLogger(__name__)


class RoundTrainer(Protocol):
    def work_on(self, task: Task, model: PeftModel) -> None:
        """Train ``task``'s round on ``model`` and end the task (submit or withdraw)."""


class _RoundClosed(Exception):
    """Raised from a training step once the server closed the task's round."""


class LocalLoopTrainer:
    """Sequence classification, or plain-text causal LM, with the built-in loop."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        dataset: TextDataset,
        stop: threading.Event,
        *,
        num_threads: int | None = None,
        progress: bool = False,
    ) -> None:
        self._tokenizer, self._dataset, self._stop = tokenizer, dataset, stop
        self._num_threads, self._progress = num_threads, progress

    def work_on(self, task: Task, model: PeftModel) -> None:
        task.load_into(model)
        config = TrainConfig.of_plan(task.training, num_threads=self._num_threads,
                                     progress=self._progress)  # fmt: skip

        def on_step(done: int, total: int, _loss: float) -> None:
            if not task.progress(done, total):
                if self._stop.is_set():
                    raise Stopped("stop requested during local training")
                raise _RoundClosed()

        started = time.monotonic()
        try:
            result = train_locally(model, self._tokenizer, self._dataset, task.factors, config,
                                   on_step=on_step)  # fmt: skip
        except _RoundClosed:
            task.withdraw("the server closed the round during local training")
            return
        except TrainingDiverged as exc:
            task.withdraw(f"local training diverged: {exc}")
            return
        elapsed = time.monotonic() - started
        logger.info("round %s: trained %s on %s samples in %s steps (%.1fs), loss %.4f",
                    task.round_index, "+".join(sorted(task.factors)), result.num_samples,
                    result.steps, elapsed, result.mean_loss)  # fmt: skip
        metrics = {"train_loss": result.mean_loss, "train_steps": float(result.steps),
                   "train_seconds": elapsed}  # fmt: skip
        submit_or_log(task, lambda: task.submit(result.tensors, num_samples=result.num_samples,
                                                metrics=metrics))  # fmt: skip


class InstructionTrainer:
    """Instruction tuning of a causal LM with TRL's ``SFTTrainer`` (see
    :mod:`fedrot_client.instructions` for the data shapes and the loss)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, data: InstructionData, *, progress: bool = False
    ) -> None:
        self._tokenizer = tokenizer
        self._dataset = data.to_dataset()
        self._source = data.source
        self._progress = progress

    def work_on(self, task: Task, model: PeftModel) -> None:
        from trl import SFTConfig

        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="fedrot-sft-") as scratch:
            args = hf.training_arguments(task, scratch, args_class=SFTConfig,
                                         disable_tqdm=not self._progress,
                                         logging_strategy="no")  # fmt: skip
            trainer = sft_trainer(model, self._tokenizer, self._dataset, args, self._source,
                                  max_length_name="training.max_length")  # fmt: skip
            try:
                submission = submit_or_log(task, lambda: hf.run_task(task, trainer))
            except SchemaError as exc:  # a non-finite update: the training diverged
                task.withdraw(f"local training diverged: {exc}")
                return
        if submission is not None:
            logger.info("round %s: trained %s in %s steps (%.1fs)", task.round_index,
                        "+".join(sorted(task.factors)), trainer.state.global_step,
                        time.monotonic() - started)  # fmt: skip


def submit_or_log(task: Task, submit):  # noqa: ANN001, ANN201
    """Run ``submit``; a round lost meanwhile (closed, refused) is logged, not raised."""
    try:
        return submit()
    except RoundLostError as exc:
        logger.warning("%s", exc)
        return None
