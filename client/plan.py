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

    def __post_init__(self) -> None:
        if (self.local_steps is None) == (self.epochs is None):
            raise ValueError(
                f"give exactly one of local_steps ({self.local_steps}) and epochs ({self.epochs})"
            )
