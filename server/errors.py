"""The server's exception tree. The servicer maps each class to one gRPC status code."""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error the server raises on purpose."""


class SettingsError(ServerError, ValueError):
    """A configuration value is invalid; the message names the setting and the value."""


class StoreError(ServerError, RuntimeError):
    """The state database could not be read or written."""


class ConflictError(StoreError):
    """A write collided with existing state (a repeated upload, a duplicate key)."""


class InvalidRequestError(ServerError, ValueError):
    """A malformed request or payload: bad chunk order, size or sha256 mismatch, bad field."""


class IncompleteUploadError(InvalidRequestError):
    """An upload stream that ended before its announced size: an interruption (the bytes it
    delivered are held for a resume), not a refusal of the update."""


class WrongStateError(ServerError):
    """A request that does not fit the run's state: wrong run or round, not a participant."""


class UploadInProgressError(WrongStateError):
    """Another upload of the same client is still streaming; retry later."""


class NotFoundError(ServerError, LookupError):
    """Something named by the request does not exist (an unenrolled client, an adapter)."""


class UnauthenticatedError(ServerError):
    """A missing, malformed or unknown token."""


class PermissionDeniedError(ServerError):
    """A known token that may not act (revoked)."""


class StalledError(ServerError):
    """A transfer that stopped making progress (no message for ``upload_stall_s``)."""


class TooLargeError(ServerError):
    """An upload or chunk above the configured limits."""


class ResumeOffsetError(ServerError):
    """An upload resumed at another offset than the bytes the server holds of it."""


class RunSettingsError(SettingsError):
    """A submitted run's settings are invalid: ``problems`` holds ``(dotted name, problem)``
    for each bad one."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("invalid run settings: " + "; ".join(f"{n}: {p}" for n, p in problems))
        self.problems = problems
