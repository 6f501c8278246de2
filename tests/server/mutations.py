"""Hypothesis strategies that damage an upload: its safetensors bytes, its JSON header, its
tensors, its header message and its chunk stream. Importable as ``mutations`` from this folder.

Each strategy draws a *fault*: a name (for the failure report) and a function that turns the
good bytes (or messages) into bad ones. Whether a damaged payload is still an acceptable
adapter is decided by the caller with the codec itself (a flipped mantissa bit is a valid
update), never guessed here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

from fedrot.codec import encode_adapter

SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
                      "F8_E4M3", "F8_E5M2", "U16", "X9", "")  # fmt: skip
TORCH_DTYPES = (torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int8,
                torch.uint8, torch.bool, torch.int64)  # fmt: skip


@dataclass(frozen=True)
class Fault:
    """One way to damage ``good``: ``apply(good) -> bad`` (bytes or messages)."""

    name: str
    apply: Callable[[Any], Any]

    def __repr__(self) -> str:
        return f"Fault({self.name})"


def split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """``(header JSON, tensor data)`` of well-formed safetensors bytes."""
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_safetensors(header: Any, data: bytes, *, length_delta: int = 0) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(text) + length_delta)) + text + data


# Byte-level damage.


def byte_flips() -> st.SearchStrategy[Fault]:
    def build(positions: list[int], masks: list[int]) -> Fault:
        def apply(good: bytes) -> bytes:
            bad = bytearray(good)
            for position, mask in zip(positions, masks, strict=False):
                bad[position % len(bad)] ^= mask
            return bytes(bad)

        return Fault(f"flip bytes at {positions}", apply)

    ints = st.integers(0, 1 << 20)
    masks = st.integers(1, 127) | st.integers(1, 255)  # 7-bit flips keep the header ASCII
    return st.builds(build, st.lists(ints, min_size=1, max_size=8),
                     st.lists(masks, min_size=8, max_size=8))  # fmt: skip


def truncations() -> st.SearchStrategy[Fault]:
    def build(keep: float, tail: bytes) -> Fault:
        return Fault(f"truncate to {keep:.3f} + {len(tail)} bytes",
                     lambda good: good[: int(len(good) * keep)] + tail)  # fmt: skip

    return st.builds(build, st.floats(0, 0.999), st.binary(max_size=16))


def random_bytes() -> st.SearchStrategy[Fault]:
    def build(data: bytes, with_prefix: bool) -> Fault:
        def apply(good: bytes) -> bytes:
            return struct.pack("<Q", len(data)) + data if with_prefix else data

        return Fault(f"random {len(data)} bytes (length prefix {with_prefix})", apply)

    return st.builds(build, st.binary(min_size=1, max_size=256), st.booleans())


# Header JSON damage.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def _entry_mutations() -> st.SearchStrategy[tuple[str, Any]]:
    dims = st.integers(-2, 1 << 40) | st.integers(0, 9)
    return st.one_of(
        st.tuples(st.just("dtype"), st.sampled_from(SAFETENSORS_DTYPES)),
        st.tuples(st.just("shape"), st.lists(dims, max_size=70)),
        st.tuples(st.just("data_offsets"), st.lists(st.integers(-1, 1 << 34), max_size=3)),
        st.tuples(st.just("extra field"), JSON_VALUES),
        st.tuples(st.just("replace entry"), JSON_VALUES),
        st.tuples(st.just("delete entry"), st.none()),
        st.tuples(st.just("rename entry"), st.text(max_size=80)),
    )


def header_edits() -> st.SearchStrategy[Fault]:
    """Edits of one tensor entry, ``__metadata__``, the top level or the length prefix."""

    def build(index: int, edit: tuple[str, Any], metadata: Any, length_delta: int) -> Fault:
        what, value = edit

        def apply(good: bytes) -> bytes:
            header, data = split_safetensors(good)
            names = sorted(k for k in header if k != "__metadata__")
            name = names[index % len(names)]
            if what in ("dtype", "shape", "data_offsets"):
                header[name] = {**header[name], what: value}
            elif what == "extra field":
                header[name] = {**header[name], "extra": value}
            elif what == "replace entry":
                header[name] = value
            elif what == "delete entry":
                del header[name]
            else:
                header[value] = header.pop(name)
            if metadata is not None:
                header["__metadata__"] = metadata
            return join_safetensors(header, data, length_delta=length_delta)

        return Fault(f"header {what} of entry {index}: {value!r:.120}, metadata {metadata!r:.60}, "
                     f"length {length_delta:+d}", apply)  # fmt: skip

    deltas = st.sampled_from([0, 0, 0, -1, 1, 7, -8, 1 << 20])
    strings = st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
    metadata = st.one_of(st.none(), st.none(), st.none(), JSON_VALUES, strings)
    return st.builds(build, st.integers(0, 64), _entry_mutations(), metadata, deltas)


def header_replacements() -> st.SearchStrategy[Fault]:
    """The whole JSON header replaced (a list, a number, nested junk) over the same data."""

    def build(value: Any) -> Fault:
        return Fault(f"header replaced by {value!r:.120}",
                     lambda good: join_safetensors(value, split_safetensors(good)[1]))  # fmt: skip

    return st.builds(build, JSON_VALUES)


def payload_faults() -> st.SearchStrategy[Fault]:
    """Any byte-level or header-level damage of a payload."""
    return st.one_of(byte_flips(), truncations(), random_bytes(), header_edits(),
                     header_replacements())  # fmt: skip


# Tensor-level damage (re-encoded through the codec: well-formed bytes, wrong content).


def tensor_faults(update: Mapping[str, Tensor]) -> st.SearchStrategy[Fault]:
    keys = sorted(update)

    def build(index: int, kind: str, dtype: torch.dtype, shape: list[int], value: float) -> Fault:
        key = keys[index % len(keys)]

        def apply(_good: bytes) -> bytes:
            tensors = dict(update)
            t = tensors[key]
            if kind == "dtype":
                tensors[key] = t.to(dtype)
            elif kind == "shape":
                tensors[key] = torch.zeros(shape)
            elif kind == "value":
                t = t.clone()
                t.view(-1)[index % t.numel()] = value
                tensors[key] = t
            elif kind == "missing":
                del tensors[key]
            elif kind == "extra":
                tensors[key + ".extra"] = t.clone()
            else:
                tensors[key[:-1] + "X"] = tensors.pop(key)
            return encode_adapter(tensors, {"producer": "fuzz"})

        return Fault(f"tensor {kind} of {key}: {dtype} {shape} {value}", apply)

    kinds = st.sampled_from(["dtype", "shape", "value", "missing", "extra", "rename"])
    values = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e38, -0.0, 3e-45])
    return st.builds(build, st.integers(0, 100), kinds, st.sampled_from(TORCH_DTYPES),
                     st.lists(st.integers(0, 9), max_size=3), values)  # fmt: skip
