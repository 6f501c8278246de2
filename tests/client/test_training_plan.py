"""The round's training settings: from the server's settings through the protocol to the
client's plan, the learning-rate schedules, the Trainer arguments, and the CUDA-only refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fedrot_client import hf
from fedrot_client.messages import training_plan_of
from fedrot_client.plan import TrainingPlan
from fedrot_client.training import TrainConfig, lr_factor, train_locally
from fedrot_server.rpc.messages import train_message
from fedrot_server.run_settings import TrainingSettings
from fedrot_server.runs.tasks import AdapterRef, TrainTask

CUDA = torch.cuda.is_available()


def plan(**fields: object) -> TrainingPlan:
    values = dict(local_steps=4, epochs=None, batch_size=2, learning_rate=0.01,
                  optimizer="adamw", weight_decay=0.0, max_length=32, seed=0)  # fmt: skip
    values.update(fields)
    return TrainingPlan(**values)  # type: ignore[arg-type]


def test_cosine_across_rounds_runs_from_the_maximum_to_the_minimum() -> None:
    settings = TrainingSettings(learning_rate=1e-3, min_learning_rate=1e-4,
                                round_lr_schedule="cosine")  # fmt: skip
    rates = [settings.learning_rate_of_round(t, 5) for t in range(5)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert rates[2] == pytest.approx(5.5e-4)  # halfway: the mean
    assert all(a > b for a, b in zip(rates, rates[1:]))
    constant = TrainingSettings(learning_rate=1e-3, min_learning_rate=1e-4)
    assert {constant.learning_rate_of_round(t, 5) for t in range(5)} == {1e-3}
    with pytest.raises(ValueError, match="min_learning_rate"):
        TrainingSettings(learning_rate=1e-4, min_learning_rate=1e-3)


def test_the_task_carries_the_rounds_settings_to_the_client() -> None:
    settings = TrainingSettings(
        learning_rate=1e-3, min_learning_rate=1e-4, round_lr_schedule="cosine",
        gradient_accumulation_steps=4, lr_scheduler="cosine", warmup_ratio=0.1,
        max_grad_norm=1.0, gradient_checkpointing=True, mixed_precision="bf16",
    )  # fmt: skip
    task = TrainTask(3, frozenset(), settings.for_round(3, 4), 7, 0.0, 60.0,
                     AdapterRef(3, 10, "0" * 64))  # fmt: skip
    received = training_plan_of(train_message(task).hyperparameters)
    assert received.learning_rate == pytest.approx(1e-4)  # the last round's
    assert (received.gradient_accumulation_steps, received.lr_scheduler, received.warmup_ratio,
            received.max_grad_norm, received.gradient_checkpointing,
            received.mixed_precision) == (4, "cosine", pytest.approx(0.1), 1.0, True, "bf16")
    default = training_plan_of(train_message(TrainTask(
        0, frozenset(), TrainingSettings(), 0, 0.0, 1.0, AdapterRef(0, 1, "0" * 64)
    )).hyperparameters)  # fmt: skip
    assert (default.max_grad_norm, default.mixed_precision, default.lr_scheduler) == (
        None, "no", "constant")


def test_the_learning_rate_within_a_round() -> None:
    warm = lr_factor(TrainConfig(steps=10, warmup_ratio=0.2, lr_scheduler="cosine"), 10)
    factors = [warm(k) for k in range(10)]
    assert factors[0] < factors[1] < factors[2] == pytest.approx(1.0)  # 2 warmup steps
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    constant = lr_factor(TrainConfig(steps=10), 10)
    assert {constant(k) for k in range(10)} == {1.0}


def test_gradient_accumulation_takes_that_many_batches_per_step(tiny_model, sentiment) -> None:
    model, tokenizer = tiny_model()
    config = TrainConfig(steps=3, batch_size=4, gradient_accumulation_steps=2, progress=False)
    steps = []
    result = train_locally(model, tokenizer, sentiment, frozenset("AB"), config,
                           on_step=lambda done, total, loss: steps.append((done, total)))
    assert result.steps == 3 and result.num_samples == 3 * 2 * 4
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_trainer_arguments_follow_the_plan(tmp_path) -> None:
    task = SimpleNamespace(training=plan(gradient_accumulation_steps=2, lr_scheduler="cosine",
                                         warmup_ratio=0.25, max_grad_norm=0.5,
                                         gradient_checkpointing=True))  # fmt: skip
    args = hf.training_arguments(task, tmp_path)  # type: ignore[arg-type]
    assert (args.max_steps, args.per_device_train_batch_size, args.gradient_accumulation_steps,
            args.learning_rate, args.warmup_steps, args.max_grad_norm) == (
        4, 2, 2, 0.01, 0.25, 0.5)  # fmt: skip
    assert args.lr_scheduler_type.value == "cosine" and args.optim.value == "adamw_torch"
    assert args.gradient_checkpointing and not args.bf16 and not args.fp16
    from trl import SFTConfig

    sft = hf.training_arguments(task, tmp_path, args_class=SFTConfig)  # type: ignore[arg-type]
    assert sft.max_length == 32 and not sft.bf16


@pytest.mark.skipif(CUDA, reason="the refusal is for clients without CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_without_cuda_is_refused_in_one_line(tmp_path, precision: str) -> None:
    task = SimpleNamespace(training=plan(mixed_precision=precision))
    with pytest.raises(ValueError, match=f"{precision} mixed precision, which needs CUDA") as raised:
        hf.training_arguments(task, tmp_path)  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="needs CUDA"):
        TrainConfig.of_plan(task.training)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_bf16_trains_on_cuda(tiny_model, sentiment) -> None:
    model, tokenizer = tiny_model()
    model.to("cuda")
    config = TrainConfig.of_plan(plan(mixed_precision="bf16", optimizer="sgd"))
    result = train_locally(model, tokenizer, sentiment, frozenset("AB"), config)
    assert math.isfinite(result.mean_loss)


def test_gradient_checkpointing_gives_the_same_update(tiny_model, sentiment) -> None:
    """Recomputing activations in the backward pass changes memory and time, not the result."""
    results = []
    for checkpointing in (False, True):
        model, tokenizer = tiny_model()
        config = TrainConfig(steps=3, batch_size=4, progress=False,
                             gradient_checkpointing=checkpointing)  # fmt: skip
        results.append(train_locally(model, tokenizer, sentiment, frozenset("AB"), config))
        assert not model.base_model.model.is_gradient_checkpointing  # switched off afterwards
    plain, checkpointed = results
    assert plain.tensors.keys() == checkpointed.tensors.keys()
    for key in plain.tensors:
        torch.testing.assert_close(plain.tensors[key], checkpointed.tensors[key])


def test_an_epoch_ends_with_a_short_accumulated_step(tiny_model, sentiment) -> None:
    """24 examples, batch 4, 4 batches a step: one full step, then a step of the 2 batches left."""
    model, tokenizer = tiny_model()
    config = TrainConfig(steps=None, epochs=1, batch_size=4, gradient_accumulation_steps=4,
                         progress=False)  # fmt: skip
    steps = []
    result = train_locally(model, tokenizer, sentiment, frozenset("AB"), config,
                           on_step=lambda done, total, loss: steps.append((done, total)))
    assert result.num_samples == 24 and result.steps == 2 and steps == [(1, 2), (2, 2)]


class CountingModel(torch.nn.Module):
    """One weight; records how many examples each forward pass trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training:
            self.seen.append(len(x))
        return {"loss": ((self.weight - x) ** 2).mean()}


@pytest.mark.parametrize(
    ("rows", "batch", "accumulation", "steps", "drop_last"),
    [(30, 4, 1, 10, False),  # an epoch of 8 steps ends with a batch of 2, then 2 full steps
     (30, 4, 1, 10, True),  # the short batch dropped: epochs of 28
     (10, 2, 2, 4, False),  # epochs of 3 steps, the last of one batch
     (8, 4, 1, 4, False)],  # whole epochs
)  # fmt: skip
def test_samples_trained_counts_the_examples_the_trainer_went_through(
    tmp_path, rows: int, batch: int, accumulation: int, steps: int, drop_last: bool
) -> None:
    from transformers import Trainer, TrainingArguments

    model = CountingModel()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, use_cpu=True,
                             per_device_train_batch_size=batch, report_to="none",
                             gradient_accumulation_steps=accumulation, save_strategy="no",
                             dataloader_drop_last=drop_last, remove_unused_columns=False,
                             logging_strategy="no", disable_tqdm=True)  # fmt: skip
    data = [{"x": float(i)} for i in range(rows)]
    collate = lambda rows: {"x": torch.tensor([r["x"] for r in rows])}  # noqa: E731
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    assert trainer.state.global_step == steps
    assert hf.samples_trained(trainer) == sum(model.seen)
