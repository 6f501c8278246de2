"""Federated rounds with a Hugging Face ``Trainer`` or TRL's ``SFTTrainer``.

::

    from fedrot_client import hf

    for task in fed.tasks():
        args = hf.training_arguments(task, "out/round", args_class=SFTConfig)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        hf.run_task(task, trainer)   # load_into, train with FedRotCallback, submit

:func:`training_arguments` maps the server's training settings onto ``TrainingArguments``
where they mean the same thing; :class:`FedRotCallback` reports progress in the task's
heartbeats and stops the trainer once the round closed or a stop was asked for;
:func:`run_task` does one round end to end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from fedrot_client.errors import Stopped
from fedrot_client.plan import check_precision_supported
from fedrot_client.task import Submission, Task
from fedrot_client.training import TrainConfig

logger = logging.getLogger(__name__)

OPTIMIZERS = {"sgd": "sgd", "adamw": "adamw_torch"}
"""The server's optimizer names -> ``TrainingArguments.optim``."""


def training_arguments(
    task: Task,
    output_dir: str | Path,
    *,
    args_class: type[TrainingArguments] = TrainingArguments,
    **overrides: Any,
) -> TrainingArguments:
    """``args_class`` (``TrainingArguments``, or a subclass such as TRL's ``SFTConfig``) for
    ``task``: ``max_steps`` (or ``num_train_epochs``), ``per_device_train_batch_size``,
    ``gradient_accumulation_steps``, ``learning_rate`` (the round's, the server having applied
    its schedule across rounds) with ``lr_scheduler_type`` and ``warmup_steps`` (the plan's warmup ratio, within
    the round), ``optim`` (``sgd`` or ``adamw_torch``), ``weight_decay``, ``max_grad_norm`` (0: no
    clipping), ``activation_checkpointing`` (gradient checkpointing), ``bf16``/``fp16`` from ``mixed_precision`` (float32
    otherwise, although TRL's configs default to bf16), ``seed`` and ``data_seed``, and
    ``max_length`` when ``args_class`` has it. No checkpoints, no reporting. ``overrides`` win.
    Mixed precision on a client without CUDA raises ``ValueError`` in one line."""
    return arguments_for(TrainConfig.of_plan(task.training), output_dir, args_class=args_class,
                         **overrides)  # fmt: skip


def arguments_for(
    config: TrainConfig,
    output_dir: str | Path,
    *,
    args_class: type[TrainingArguments] = TrainingArguments,
    **overrides: Any,
) -> TrainingArguments:
    """:func:`training_arguments` for a :class:`~fedrot_client.training.TrainConfig` (the
    built-in loop's settings; the simulator's clients)."""
    check_precision_supported(config, torch.cuda.is_available())
    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": config.steps or -1,
        "num_train_epochs": config.epochs or 1,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.lr,
        "lr_scheduler_type": config.lr_scheduler,
        "warmup_steps": config.warmup_ratio,  # a float in [0, 1) is a fraction of the steps
        "optim": OPTIMIZERS.get(config.optimizer, config.optimizer),
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm or 0.0,
        "activation_checkpointing": config.gradient_checkpointing,  # transformers 5's name
        "bf16": config.mixed_precision == "bf16",
        "fp16": config.mixed_precision == "fp16",
        "seed": config.seed,
        "data_seed": config.seed,
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 1,
    }
    if "max_length" in {field.name for field in dataclasses.fields(args_class)}:
        values["max_length"] = config.max_length
    values.update(overrides)
    return args_class(**values)


class FedRotCallback(TrainerCallback):
    """Reports each optimiser step to the task (the dashboard sees the progress) and ends
    training early when the round closed for this client or a stop was asked for."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **_: Any) -> Any:
        if not self.task.progress(state.global_step, state.max_steps):
            logger.warning("round %s: closed or stopping; ending local training",
                           self.task.round_index)  # fmt: skip
            control.should_training_stop = True
        return control


def samples_trained(trainer: Trainer) -> int:
    """Examples the trainer went through (the round's aggregation weight): whole epochs count
    their examples (an epoch's last batch may be short, or dropped with
    ``dataloader_drop_last``), the steps into the epoch under way count full batches."""
    args, state = trainer.args, trainer.state
    per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    dataset = trainer.train_dataset
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        return max(state.global_step * per_step, 1)  # an iterable dataset: batches are full
    batch = args.train_batch_size * args.world_size
    if args.dataloader_drop_last:
        batches, epoch_examples = len(dataset) // batch, len(dataset) // batch * batch
    else:
        batches, epoch_examples = math.ceil(len(dataset) / batch), len(dataset)
    steps_per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    epochs, steps_into_epoch = divmod(state.global_step, steps_per_epoch)
    return max(epochs * epoch_examples + min(steps_into_epoch * per_step, epoch_examples), 1)


def run_task(task: Task, trainer: Trainer) -> Submission | None:
    """One round with ``trainer``: load the round's adapter into ``trainer.model`` (freezing
    the factors the round does not train), train with a :class:`FedRotCallback`, submit the
    model with ``train_loss``. Returns None when the round closed during training (the task
    is then withdrawn); raises :class:`~fedrot_client.errors.Stopped` on a stop."""
    task.load_into(trainer.model)
    callback = FedRotCallback(task)
    trainer.add_callback(callback)
    try:
        output = trainer.train()
    finally:
        trainer.remove_callback(callback)
    if task.is_open:
        metrics = {"train_loss": float(output.training_loss),
                   "train_steps": float(trainer.state.global_step)}  # fmt: skip
        return task.submit(trainer.model, num_samples=samples_trained(trainer), metrics=metrics)
    if task.closed:
        task.withdraw("the server closed the round during local training")
        return None
    raise Stopped("stop requested during local training")
