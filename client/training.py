"""One client's local training for one round: only the planned LoRA factors (and the head) move.

The caller loads the round's global adapter into the model first (``lora.load_adapter``);
``train_locally`` then trains from it and returns the trained tensors to upload. FedIT and
FedRot train both factors; FFA-LoRA only B; RoLoRA alternates. Plain SGD, as in the paper, by
default.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

import torch
from peft import PeftModel
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedrot.adapters import Factor
from fedrot_client.batches import encode_batch, shuffled_batches
from fedrot_client.data import TextDataset
from fedrot_client.errors import TrainingDiverged
from fedrot_client.lora import export_adapter, set_trainable_factors, task_of
from fedrot_client.plan import TrainingPlan, check_precision_supported

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, float], None]
"""Called after every optimiser step with ``(steps_done, total_steps, loss)``; it may raise to
abandon training (a daemon asked to stop, a round that closed)."""


class OptimizerName(StrEnum):
    SGD = "sgd"
    ADAMW = "adamw"


@dataclass(frozen=True)
class TrainConfig:
    """Local training of one round. Give ``steps`` (batches) or ``epochs``, not both.

    ``num_threads`` sets ``torch.set_num_threads`` for the call when given (CPU clients).
    """

    steps: int | None = 20
    epochs: int | None = None
    batch_size: int = 16
    lr: float = 0.02
    optimizer: OptimizerName = OptimizerName.SGD
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    max_length: int = 64
    seed: int = 0
    num_threads: int | None = None
    progress: bool = True
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "constant"  # or "cosine": down to 0 at the last step
    warmup_ratio: float = 0.0
    mixed_precision: str = "no"  # "bf16" / "fp16": autocast on CUDA
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", OptimizerName(self.optimizer))
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"give exactly one of steps ({self.steps}) and epochs ({self.epochs})")
        for name in ("steps", "epochs", "batch_size", "max_length", "num_threads",
                     "gradient_accumulation_steps"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")

    @classmethod
    def of_plan(
        cls, plan: TrainingPlan, *, num_threads: int | None = None, progress: bool = False
    ) -> TrainConfig:
        """The built-in trainer's config for a round's :class:`TrainingPlan` (``ValueError`` in
        one line for mixed precision without CUDA)."""
        check_precision_supported(plan, torch.cuda.is_available())
        return cls(
            steps=plan.local_steps,
            epochs=plan.epochs,
            batch_size=plan.batch_size,
            lr=plan.learning_rate,
            optimizer=OptimizerName(plan.optimizer),
            weight_decay=plan.weight_decay,
            max_length=plan.max_length,
            seed=plan.seed,
            num_threads=num_threads,
            progress=progress,
            max_grad_norm=plan.max_grad_norm,
            gradient_accumulation_steps=plan.gradient_accumulation_steps,
            lr_scheduler=plan.lr_scheduler,
            warmup_ratio=plan.warmup_ratio,
            mixed_precision=plan.mixed_precision,
            gradient_checkpointing=plan.gradient_checkpointing,
        )


@dataclass(frozen=True)
class TrainResult:
    """What a client uploads: the trained factors and the head (PEFT keys, float32, CPU).

    ``num_samples`` counts examples processed (the aggregation weight ``n_i``);
    ``mean_loss`` is the sample-weighted mean training loss over the round.
    """

    tensors: Mapping[str, Tensor]
    trained: frozenset[Factor]
    num_samples: int
    mean_loss: float
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))


def train_locally(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
    trained: frozenset[Factor],
    config: TrainConfig,
    *,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``dataset``; only ``trained`` factors and the head change.

    Works on the model's own device. Dropout and batch order are seeded by ``config.seed``;
    the global RNG state is restored afterwards. ``on_step`` sees the progress after each step;
    an exception it raises ends training and propagates (the model is left part-trained).
    """
    if not trained:
        raise ValueError("trained must name at least one factor")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    names = set_trainable_factors(model, frozenset(trained))
    parameters = [p for p in model.parameters() if p.requires_grad]
    logger.debug("training %s tensors (%s values)", len(names), sum(p.numel() for p in parameters))
    optimizer = _build_optimizer(parameters, config)
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _checkpointing(model, config):
        torch.manual_seed(config.seed)
        samples, loss_sum, steps = _run_steps(
            model, tokenizer, dataset, optimizer, config, on_step
        )
    model.eval()
    return TrainResult(
        tensors=export_adapter(model, frozenset(trained)),
        trained=frozenset(trained),
        num_samples=samples,
        mean_loss=loss_sum / max(samples, 1),
        steps=steps,
    )


def _run_steps(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    on_step: StepCallback | None = None,
) -> tuple[int, float, int]:
    """Optimiser steps of ``gradient_accumulation_steps`` batches each; returns the samples
    seen, their summed loss and the optimiser steps taken."""
    task = task_of(model)
    device = next(model.parameters()).device
    accumulate = config.gradient_accumulation_steps
    batches = shuffled_batches(len(dataset), config.batch_size, seed=config.seed,
                               steps=config.steps * accumulate if config.steps else None,
                               epochs=config.epochs)  # fmt: skip
    num_batches = math.ceil(len(dataset) * (config.epochs or 0) / config.batch_size)
    total = config.steps or math.ceil(num_batches / accumulate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, total))
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    samples, loss_sum, steps, pending = 0, 0.0, 0, 0
    model.train()
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(batches, total=total * accumulate, desc="local training",
               disable=not config.progress)  # fmt: skip
    for indices in bar:
        batch = encode_batch(tokenizer, dataset, indices, task, config.max_length, device)
        with _autocast(config.mixed_precision, device):
            loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training loss is {loss.item()} at step {steps}")
        (loss / accumulate).backward()
        samples += len(indices)
        loss_sum += loss.item() * len(indices)
        pending += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if pending < accumulate and samples < len(dataset) * (config.epochs or math.inf):
            continue
        if pending < accumulate:  # a short last step: its batches' mean, like a full one's
            for parameter in parameters:
                if parameter.grad is not None:
                    parameter.grad.mul_(accumulate / pending)
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        steps, pending = steps + 1, 0
        if on_step is not None:
            on_step(steps, total, loss.item())
    return samples, loss_sum, steps


def lr_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier of optimiser step ``k`` within a round: a linear warmup over
    ``warmup_ratio`` of the steps, then constant, or cosine down to 0 at the last step."""
    warmup = math.ceil(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_scheduler != "cosine":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@contextlib.contextmanager
def _checkpointing(model: PeftModel, config: TrainConfig) -> Iterator[None]:
    """Gradient (activation) checkpointing for the call when the config asks for it."""
    if not config.gradient_checkpointing:
        yield
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "no" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _build_optimizer(
    parameters: list[torch.nn.Parameter], config: TrainConfig
) -> torch.optim.Optimizer:
    if config.optimizer is OptimizerName.ADAMW:
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, weight_decay=config.weight_decay)
