"""The client's own errors, under the core's :class:`fedrot.errors.FedRotError`."""

from __future__ import annotations

from fedrot.errors import FedRotError


class DataError(FedRotError, ValueError):
    """A data file, row or field that cannot be used; the message names the file and the row."""


class ModelError(FedRotError, ValueError):
    """A base model that cannot be loaded, or that differs from the run's specification."""
