"""The client's own errors, under the core's :class:`fedrot.errors.FedRotError`."""

from __future__ import annotations

from fedrot.errors import FedRotError


class DataError(FedRotError, ValueError):
    """A data file, row or field that cannot be used; the message names the file and the row."""


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
