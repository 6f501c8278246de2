"""The command line's file side: weighted input paths, adapter files in and out.

The core never touches files; this module reads bytes and hands them to :mod:`fedrot.codec`,
and writes what the codec encodes. Every problem with a file raises :class:`InputError` whose
message starts with the file's path, so the command can print it as one line.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedrot.adapters import BOTH_FACTORS, AdapterSchema, Factor
from fedrot.codec import DecodedAdapter, decode_adapter, tensor_names
from fedrot.errors import CodecError, FedRotError


class InputError(Exception):
    """Bad command-line input (a file, a weight, an option): the command exits with status 2."""


@dataclass(frozen=True)
class WeightedPath:
    """A client file and its aggregation weight (positive, finite; not yet normalised)."""

    path: Path
    weight: float


def parse_weighted_path(argument: str) -> WeightedPath:
    """``PATH[:WEIGHT]``: split on the last ':' when what follows is a number.

    Paths may contain ':' themselves: an argument that names an existing file is that file
    (weight 1), and a suffix that is not a number stays part of the path. Otherwise a numeric
    suffix must be a positive finite weight.
    """
    head, sep, tail = argument.rpartition(":")
    if not sep or not head or Path(argument).is_file():
        return WeightedPath(Path(argument), 1.0)
    try:
        weight = float(tail)
    except ValueError:
        if Path(head).is_file() and not Path(argument).exists():
            raise InputError(f"{head}: bad weight {tail!r}: not a number") from None
        return WeightedPath(Path(argument), 1.0)
    if math.isfinite(weight) and weight > 0.0:
        return WeightedPath(Path(head), weight)
    raise InputError(f"{head}: bad weight {tail!r}: must be a positive finite number")


def read_adapter_file(
    path: Path,
    schema: AdapterSchema | None = None,
    factors: Iterable[Factor] = BOTH_FACTORS,
    optional: frozenset[Factor] = frozenset(),
) -> DecodedAdapter:
    """Read and decode a safetensors adapter file holding ``factors``, and those of
    ``optional`` that it has keys for; any problem is an :class:`InputError`."""
    data = _read_bytes(path)
    wanted = set(factors)
    if optional:
        try:
            names = tensor_names(data)
        except CodecError:
            names = frozenset()  # decoding says what is wrong
        wanted |= {f for f in optional if any(n.endswith(f.suffix) for n in names)}
    try:
        return decode_adapter(data, schema, wanted)
    except FedRotError as exc:
        raise InputError(f"{path}: {exc}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a safetensors file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as exc:
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
