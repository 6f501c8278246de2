"""One round's work for one client: what to train, from which adapter, and how to hand it in.

A :class:`Task` comes from :meth:`fedrot_client.Federation.tasks`. It holds the round's
global adapter (downloaded and verified before the task is handed out), the factors the
round trains and the server's training settings. While the task is open a background
heartbeat tells the server the client is alive and how far it got (:meth:`Task.progress`).
A task ends exactly once: :meth:`Task.submit` sends the update, :meth:`Task.withdraw` gives
the round up (the server stops waiting for this client and does not offer the round again).
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from peft import PeftModel
from torch import Tensor

from fedrot.adapters import Factor
from fedrot.codec import encode_adapter
from fedrot_client.errors import RoundClosedError, RoundLostError, UsageError
from fedrot_client.heartbeats import Heartbeats
from fedrot_client.lora import load_adapter, set_trainable_factors
from fedrot_client.plan import TrainingPlan
from fedrot_client.run_info import Submission
from fedrot_client.state import PendingUpload
from fedrot_client.transport import sha256_hex
from fedrot_client.updates import Update, update_tensors
from fedrot_proto.v1 import federation_pb2 as pb

if TYPE_CHECKING:
    from fedrot_client.federation import Federation

logger = logging.getLogger(__name__)


class Task:
    """The round ``round_index``: train ``factors`` (and the head) from the global adapter."""

    def __init__(
        self,
        federation: Federation,
        message: pb.TrainTask,
        factors: frozenset[Factor],
        training: TrainingPlan,
        global_tensors: Mapping[str, Tensor],
        heartbeats: Heartbeats,
    ) -> None:
        self.round_index: int = message.round
        self.factors: frozenset[Factor] = factors
        self.training: TrainingPlan = training
        left = message.time_left.ToNanoseconds() / 1e9 if message.HasField("time_left") else 0
        self._deadline = time.monotonic() + left if left > 0 else math.inf
        self._federation = federation
        self._global = dict(global_tensors)
        self._heartbeats = heartbeats
        self._ended: str | None = None  # "submitted", "withdrawn", "lost", "abandoned"
        self.has_saved_update = False  # submit saved an update (not yet accepted, maybe)

    def __repr__(self) -> str:
        factors = "+".join(sorted(self.factors))
        return f"Task(round_index={self.round_index}, factors={factors}, ended={self._ended})"

    # -- state -------------------------------------------------------------------------------
    @property
    def ended(self) -> bool:
        """Whether the task was submitted or withdrawn."""
        return self._ended is not None

    @property
    def closed(self) -> bool:
        """Whether the server closed the round for this client (a heartbeat told it)."""
        return self._heartbeats.round_closed

    @property
    def is_open(self) -> bool:
        """True while an update can still be submitted: not ended, not closed, not stopping."""
        return not self.ended and not self.closed and not self._federation.stopping

    def seconds_left(self) -> float:
        """Time until the round's deadline as the server announced it (``inf``: none)."""
        return max(self._deadline - time.monotonic(), 0.0)

    # -- the round's adapter -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """The round's global adapter: PEFT keys -> float32 CPU tensors (copies)."""
        return {key: tensor.clone() for key, tensor in self._global.items()}

    def load_into(self, model: PeftModel) -> None:
        """Load the round's global adapter into ``model`` (a ``PeftModel`` of the run's base
        model and LoRA) and make only this round's factors and the head trainable: the frozen
        factor and the base weights get ``requires_grad=False``. Raises
        :class:`~fedrot.errors.SchemaError` naming the key when the model does not fit."""
        self._federation.require_open()
        if not isinstance(model, PeftModel):
            raise UsageError(f"load_into takes a peft.PeftModel, not {type(model).__name__}")
        load_adapter(model, self._global)
        set_trainable_factors(model, self.factors)
        self._heartbeats.report(pb.CLIENT_PHASE_TRAINING, 0.0)

    # -- while training ----------------------------------------------------------------------
    def progress(self, done: int, total: int) -> bool:
        """Report ``done`` of ``total`` training steps (the heartbeat carries it to the
        dashboard). Returns :attr:`is_open`: False once the round closed or a stop was asked
        for, so a loop can ``break``."""
        if total > 0:
            self._heartbeats.report(pb.CLIENT_PHASE_TRAINING, min(max(done / total, 0.0), 1.0))
        return self.is_open

    # -- ending ------------------------------------------------------------------------------
    def submit(
        self,
        update: Update,
        *,
        num_samples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> Submission:
        """Send this round's update: ``update`` is the trained ``PeftModel`` or its adapter
        state dict (PEFT keys, as ``peft.get_peft_model_state_dict`` gives); ``num_samples``
        (> 0) is the number of examples trained on, the update's aggregation weight;
        ``metrics`` are finite numbers shown on the dashboard (e.g. ``train_loss``).

        Everything is checked before a byte is sent: a frozen factor that changed, wrong keys,
        shapes, rank or dtype, non-finite values. The update is saved in the state folder
        first, so a restarted client sends it again instead of training again. Raises
        :class:`~fedrot_client.errors.RoundClosedError` when the round closed first,
        :class:`~fedrot_client.errors.UpdateRefusedError` when the server refuses its content.
        """
        self._check_can_end("submit")
        if self.closed:
            raise RoundClosedError(
                f"round {self.round_index} closed for this client before its update was sent "
                "(check task.is_open; go on with the next task)",
                self.round_index,
            )
        count = _checked_sample_count(num_samples)
        values = _checked_metrics(metrics or {})
        tensors = update_tensors(update, self._global, self.factors, self._federation.schema)
        pending, payload = self._save(tensors, count, values)
        self.has_saved_update = True
        self._heartbeats.report(pb.CLIENT_PHASE_UPLOADING, 0.0)
        try:
            submission = self._federation.ledger.send_update(pending, payload)
        except RoundLostError:
            self._end("lost")
            raise
        self._end("submitted")
        return submission

    def withdraw(self, reason: str) -> None:
        """Give the round up: the server stops waiting for this client (it is not offered the
        round again, also after a restart). ``reason`` goes to the log."""
        self._check_can_end("withdraw")
        self._end("withdrawn")
        self._federation.ledger.give_up_round(self.round_index, reason, tell_server=not self.closed)

    def abandon(self) -> None:
        """End the task without a word to the server (the process is stopping): the round is
        trained again after a restart if it is still open then."""
        if not self.ended:
            self._end("abandoned")

    def _end(self, how: str) -> None:
        self._ended = how
        self._heartbeats.stop()

    def _check_can_end(self, verb: str) -> None:
        self._federation.require_open()
        if self._ended is not None:
            raise UsageError(f"round {self.round_index}: cannot {verb}, the task was already "
                             f"{self._ended}")  # fmt: skip

    def _save(
        self, tensors: Mapping[str, Tensor], count: int, metrics: Mapping[str, float]
    ) -> tuple[PendingUpload, bytes]:
        federation = self._federation
        run_id, client_id = federation.run.run_id, federation.run.client_id
        factors = "".join(sorted(self.factors))
        metadata = {"run_id": run_id, "round": str(self.round_index), "client_id": client_id,
                    "factors": factors}  # fmt: skip
        payload = encode_adapter(tensors, metadata)
        pending = PendingUpload(
            run_id=run_id,
            round_index=self.round_index,
            idempotency_key=idempotency_key(run_id, client_id, self.round_index),
            sample_count=count,
            factors=tuple(sorted(self.factors)),
            sha256=sha256_hex(payload),
            metrics=dict(metrics),
        )
        federation.ledger.save_pending(pending, payload)
        return pending, payload


def idempotency_key(run_id: str, client_id: str, round_index: int) -> str:
    """The same for every attempt (and every restart) at one round's update."""
    return hashlib.sha256(f"{run_id}|{client_id}|{round_index}".encode()).hexdigest()[:32]


def _checked_sample_count(value: object) -> int:
    """A positive integer (a numpy or 0-d tensor integer too), not a bool or a float."""
    try:
        count = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        count = 0
    if isinstance(value, bool) or count < 1:
        raise UsageError(f"num_samples must be a positive int (examples trained on), got "
                         f"{value!r}")  # fmt: skip
    return count


def _checked_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise UsageError(f"metrics must be a mapping of name -> number, not "
                         f"{type(metrics).__name__}")  # fmt: skip
    checked = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise UsageError(f"metric name {name!r}: expected a non-empty str")
        if isinstance(value, bool):
            raise UsageError(f"metric {name}: {value!r} is a boolean, not a number")
        if not isinstance(value, int | float):
            try:
                value = float(value)  # a 0-d tensor or a numpy number
            except (TypeError, ValueError):
                raise UsageError(f"metric {name}: {value!r} is not a number") from None
        if not math.isfinite(value):
            raise UsageError(f"metric {name}: {value} is not finite")
        checked[name] = float(value)
    return checked
