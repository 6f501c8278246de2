"""The server's training settings for one round, as the task carries them (``task.training``).

The same names as the server's ``training.*`` settings. Either ``local_steps`` (optimiser
steps, i.e. batches) or ``epochs`` (passes over the client's data) is set, never both. A
client's own training code may follow them or not; the built-in trainer does
(:meth:`fedrot_client.training.TrainConfig.of_plan`), and
:func:`fedrot_client.hf.training_arguments` maps them onto ``transformers.TrainingArguments``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingPlan:
    """Local training of one round: ``local_steps`` batches, or ``epochs`` passes."""

    local_steps: int | None
    epochs: int | None
    batch_size: int
    learning_rate: float
    optimizer: str  # "sgd" or "adamw"
    weight_decay: float
    max_length: int  # longest tokenised sequence
    seed: int  # seeds the batch order (and dropout) of this round
    gradient_accumulation_steps: int = 1  # batches per optimiser step
    lr_scheduler: str = "constant"  # within the round: "constant" or "cosine" (down to 0)
    warmup_ratio: float = 0.0  # fraction of the round's steps warming up from 0
    max_grad_norm: float | None = None  # clip the global gradient norm (None: no clipping)
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # "no" (float32), "bf16" or "fp16" (CUDA only)

    def __post_init__(self) -> None:
        if (self.local_steps is None) == (self.epochs is None):
            raise ValueError(
                f"give exactly one of local_steps ({self.local_steps}) and epochs ({self.epochs})"
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler {self.lr_scheduler!r} is not one of {LR_SCHEDULERS}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision {self.mixed_precision!r} is not one of "
                             f"{MIXED_PRECISIONS}")  # fmt: skip


LR_SCHEDULERS = ("constant", "cosine")
MIXED_PRECISIONS = ("no", "bf16", "fp16")


def check_precision_supported(plan: TrainingPlan, cuda_available: bool) -> None:
    """Refuse, in one line, mixed precision on a client without CUDA."""
    if plan.mixed_precision != "no" and not cuda_available:
        raise ValueError(f"the run trains in {plan.mixed_precision} mixed precision, which needs "
                         "CUDA; this client has no CUDA device")  # fmt: skip
