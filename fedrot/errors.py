"""The exception tree of the core. Transports map these to status codes in one place each."""

from __future__ import annotations


class FedRotError(Exception):
    """Base of every error the core raises on purpose."""


class CodecError(FedRotError, ValueError):
    """Bytes that are not a readable safetensors adapter (truncated, corrupt, bad header)."""


class SchemaError(FedRotError, ValueError):
    """Tensors that do not match the expected adapter schema.

    The message names the offending key and the shapes or dtype involved.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class AggregationStateError(FedRotError, RuntimeError):
    """An aggregator used out of order (added to after finalising, finalised with no update)."""
