"""The client's own errors, under the core's :class:`fedrot.errors.FedRotError`."""

from __future__ import annotations

from fedrot.errors import FedRotError


class DataError(FedRotError, ValueError):
    """A data file, row or field that cannot be used; the message names the file and the row."""


class UnknownLabelError(DataError):
    """A label value that the label names in use (the run's, or ``--labels``) do not hold, or
    an id outside them; the message names the value (and, from a file, the file and row)."""


class DataMismatchError(DataError):
    """The client's data does not fit the run: another task (classification data for a
    causal-LM run, instruction data for a classification run) or other label names. The
    message is the one line the client declines the run with."""


class RunDeclinedError(FedRotError):
    """This client declined a run (``reason``) and the server has no other run for it (a
    single-run server, or one that predates DeclineRun), or it was to take part in one run
    only."""

    def __init__(self, reason: str, run_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.run_id = run_id


class ModelError(FedRotError, ValueError):
    """A base model that cannot be loaded, or that differs from the run's specification."""


class ServerUnavailableError(FedRotError, ConnectionError):
    """The server stayed unreachable (UNAVAILABLE, DEADLINE_EXCEEDED) past the reconnect limit."""


class RejectedError(FedRotError):
    """The server refused a call with a status that retrying does not fix.

    ``code`` is the ``grpc.StatusCode``; ``details`` the server's message.
    """

    def __init__(self, method: str, code: object, details: str) -> None:
        name = getattr(code, "name", str(code))
        super().__init__(f"{method}: server answered {name}: {details}")
        self.method = method
        self.code = code
        self.details = details


class StateError(FedRotError):
    """The state folder cannot be written, or belongs to another client."""


class TrainingDiverged(FedRotError, ArithmeticError):
    """Local training produced a non-finite loss (the round's hyperparameters do not suit this
    client's data): the round's update cannot be sent."""


class TransferError(FedRotError, ValueError):
    """A downloaded payload whose size or SHA-256 differs from what the server announced."""


class Interrupted(Exception):
    """The daemon's current step was abandoned: it was asked to stop, or its round closed."""


class UsageError(FedRotError, RuntimeError):
    """The SDK was used in a way it cannot serve: a task submitted twice, a federation used
    outside its ``with`` block, an update of the wrong type. The message names the problem."""


class FrozenFactorError(FedRotError, ValueError):
    """An update changed a LoRA factor its round keeps frozen (FFA-LoRA trains only B; RoLoRA
    alternates); ``key`` names the first such tensor."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class RoundLostError(FedRotError):
    """This client's update for ``round_index`` will not count: see the two subclasses."""

    def __init__(self, message: str, round_index: int) -> None:
        super().__init__(message)
        self.round_index = round_index


class RoundClosedError(RoundLostError):
    """The round closed for this client (its deadline passed, or the run moved on) before its
    update was accepted."""


class UpdateRefusedError(RoundLostError):
    """The server refused the update's content (e.g. a value above its limit); sending the same
    update again cannot help, so the round is given up."""


class RunChangedError(FedRotError):
    """The server restarted with a run whose model, LoRA or adapter shapes differ from the one
    this federation joined: connect again (and build the model again) to join it."""


class Stopped(SystemExit):  # noqa: N818 - a way to exit, not an error
    """The process was asked to stop (SIGTERM or SIGINT) while working for a federation.

    A ``SystemExit`` with status 0, so that ``except Exception`` in training code does not
    swallow it and, should it escape, the process ends quietly as a stopped program should. The
    federation's ``with`` block ends quietly on it (``fed.stopped``). ``reason`` says why."""

    def __init__(self, reason: str = "stop requested") -> None:
        super().__init__(0)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason
