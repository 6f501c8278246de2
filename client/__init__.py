"""FedRot's client: the SDK for bringing your own training code, and the daemon built on it.

The public API (documented name by name in ``docs/sdk.md``)::

    import fedrot_client

    with fedrot_client.connect("host:port", token="...", state_dir="...") as fed:
        model = fed.build_model()
        for task in fed.tasks():
            task.load_into(model)
            ...  # your training
            task.submit(model, num_samples=n, metrics={"train_loss": loss})
        fed.save_final("out/")

    for fed in fedrot_client.runs("host:port", token="...", state_dir="..."):  # a standing server
        with fed:
            ...  # the same, once per run

:mod:`fedrot_client.hf` runs a ``transformers.Trainer`` (or TRL's ``SFTTrainer``) per task.
``fedrot-client`` (:mod:`fedrot_client.daemon`) is the built-in trainer on the same API.
Importing this package is light: the SDK's modules load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedrot.adapters import Factor
    from fedrot_client.errors import (
        FrozenFactorError,
        ModelError,
        RejectedError,
        RoundClosedError,
        RoundLostError,
        RunChangedError,
        RunDeclinedError,
        ServerUnavailableError,
        StateError,
        Stopped,
        UpdateRefusedError,
        UsageError,
    )
    from fedrot_client.connection import connect, runs
    from fedrot_client.federation import Federation
    from fedrot_client.plan import TrainingPlan
    from fedrot_client.run_info import RoundRecord, RunInfo, Submission
    from fedrot_client.settings import SettingsError
    from fedrot_client.task import Task

_EXPORTS = {
    "connect": "fedrot_client.connection",
    "runs": "fedrot_client.connection",
    "Federation": "fedrot_client.federation",
    "Task": "fedrot_client.task",
    "Submission": "fedrot_client.run_info",
    "TrainingPlan": "fedrot_client.plan",
    "RunInfo": "fedrot_client.run_info",
    "RoundRecord": "fedrot_client.run_info",
    "Factor": "fedrot.adapters",
    "SettingsError": "fedrot_client.settings",
    **dict.fromkeys(
        ("UsageError", "FrozenFactorError", "RoundLostError", "RoundClosedError",
         "UpdateRefusedError", "RunChangedError", "RunDeclinedError", "Stopped", "ModelError",
         "RejectedError", "ServerUnavailableError", "StateError"),
        "fedrot_client.errors",
    ),  # fmt: skip
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedrot_client' has no attribute {name!r}")
    return getattr(import_module(module), name)
