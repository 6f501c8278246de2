"""The one codec: safetensors bytes <-> tensors in PEFT key naming, and their validation.

Every adapter that crosses a process boundary (a gRPC upload or broadcast, a file given to
``fedrot aggregate``) goes through :func:`encode_adapter` and :func:`decode_adapter`. The format
is safetensors: an 8-byte little-endian header length, a JSON header (tensor names, dtypes,
shapes, offsets, and string ``__metadata__``), then raw little-endian tensor data. Nothing here
unpickles: safetensors writes the bytes; bytes from a peer have their header checked by the
rules safetensors applies (:func:`_layout_of`) before any tensor is built, and the tensors are
then views of those bytes, not copies.

Keys are PEFT state-dict keys: ``<module>.lora_A.weight`` of shape ``(r, d_in)``,
``<module>.lora_B.weight`` of shape ``(d_out, r)``, and extra trainable tensors (a classifier
head) under their own keys. Accepted dtypes are float32, float16 and bfloat16; the round trip
keeps the dtype and every bit (bfloat16 included).
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeGuard

import safetensors.torch
import torch
from torch import Tensor

from fedrot.adapters import BOTH_FACTORS, Adapter, AdapterSchema, Factor, split_state_dict
from fedrot.errors import CodecError, SchemaError

WIRE_DTYPES: Mapping[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
"""safetensors dtype name -> torch dtype, for the dtypes an adapter may hold."""

ALLOWED_DTYPES: frozenset[torch.dtype] = frozenset(WIRE_DTYPES.values())

_HEADER_LENGTH_BYTES = 8
_HEADER_ALIGNMENT = 8  # safetensors pads its JSON header with spaces to a multiple of this

HEADER_SLACK_BYTES = 16 * 1024
"""Room :func:`max_encoded_size` leaves for a header's ``__metadata__`` (the client SDK writes
under 200 bytes of it: run id, round, client id, factors)."""

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
"""The file of a PEFT adapter directory that holds the tensors (written by this codec)."""
ADAPTER_CONFIG_FILE = "adapter_config.json"
"""The file of a PEFT adapter directory that holds its ``LoraConfig`` as JSON."""


@dataclass(frozen=True)
class DecodedAdapter:
    """What :func:`decode_adapter` returns: CPU tensors by PEFT key, and the header metadata."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]

    def to_adapter(self) -> Adapter:
        """The tensors as an :class:`Adapter` (every module must hold both factors)."""
        return Adapter.from_state_dict(self.tensors)


def encode_adapter(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise ``tensors`` (any device, any layout) to safetensors bytes.

    Tensors are copied to contiguous CPU memory; dtypes are kept as they are (validation is
    the decoder's job). ``metadata`` goes into the header and must map ``str`` to ``str``.
    """
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata {key!r}: keys and values must be str, got {value!r}")
    prepared = _detached_cpu_tensors(tensors)
    return safetensors.torch.save(prepared, metadata=meta or None)


def max_encoded_size(
    schema: AdapterSchema,
    factors: Iterable[Factor] = BOTH_FACTORS,
    *,
    header_slack: int = HEADER_SLACK_BYTES,
) -> int:
    """The most bytes :func:`encode_adapter` can give for an update that :func:`decode_adapter`
    accepts against ``schema`` and ``factors``: every expected key in the widest accepted dtype
    (float32), each header entry at its longest (the longest dtype name, offsets of the most
    digits), the header's alignment padding, and ``header_slack`` bytes for its
    ``__metadata__``. Anything larger is no acceptable update.
    """
    shapes = schema.expected_shapes(factors)
    width = max(dtype.itemsize for dtype in ALLOWED_DTYPES)
    data = sum(math.prod(shape) * width for shape in shapes.values())
    entries = sum(_max_header_entry(key, shape, data) for key, shape in shapes.items())
    header = len("{}") + entries + max(len(shapes) - 1, 0) + header_slack  # commas between
    return _HEADER_LENGTH_BYTES + header + _HEADER_ALIGNMENT - 1 + data


def _max_header_entry(key: str, shape: tuple[int, ...], largest_offset: int) -> int:
    """The most bytes of ``"key":{"dtype":..,"shape":[..],"data_offsets":[..]}`` in a header
    (compact UTF-8 JSON, escaping as safetensors' serde_json does)."""
    longest = max(WIRE_DTYPES, key=len)
    entry = {"dtype": longest, "shape": list(shape), "data_offsets": [largest_offset] * 2}
    text = json.dumps({key: entry}, separators=(",", ":"), ensure_ascii=False)
    return len(text.encode()) - len("{}")


def _detached_cpu_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies where needed; tensors that share storage are cloned apart."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{key}: expected a torch.Tensor, got {type(tensor).__name__}")
        cpu = tensor.detach().to("cpu").contiguous()
        pointer = cpu.untyped_storage().data_ptr()
        if pointer in seen and cpu.numel() > 0:
            cpu = cpu.clone()
            pointer = cpu.untyped_storage().data_ptr()
        seen.add(pointer)
        out[key] = cpu
    return out


Buffer = bytes | bytearray | memoryview | mmap.mmap
"""What :func:`decode_adapter` reads: any contiguous bytes. A writable one (a bytearray, a
writable mmap) is not copied: the tensors are views of it."""


def decode_adapter(
    data: Buffer,
    schema: AdapterSchema | None = None,
    factors: Iterable[Factor] = BOTH_FACTORS,
    *,
    max_bytes: int | None = None,
    max_abs: float | None = None,
) -> DecodedAdapter:
    """Parse safetensors bytes into CPU tensors and validate them.

    With ``schema``, the tensors must be exactly the keys and shapes it expects for
    ``factors`` (plus its extras); without one, the A/B pairs must fit together and share one
    rank (see :func:`validate_tensors`); with ``max_abs``, no value may exceed it in absolute
    value. Raises :class:`CodecError` for unreadable bytes (empty, truncated, corrupt header,
    bad offsets, larger than ``max_bytes``) and :class:`SchemaError` for readable bytes that
    are not an acceptable adapter.

    The layout is checked as safetensors checks it (see :func:`_layout_of`) before any tensor
    is built. The tensors are views of ``data`` when it is writable (no copy; they keep it
    alive), else of one writable copy of it.
    """
    view = memoryview(data).cast("B")
    if not len(view):
        raise CodecError("empty adapter: no bytes")
    if max_bytes is not None and len(view) > max_bytes:
        raise CodecError(f"adapter of {len(view)} bytes exceeds the limit of {max_bytes} bytes")
    layout = _layout_of(view)
    writable = view if not view.readonly else memoryview(bytearray(view))
    tensors = {entry.key: _tensor_of(writable, entry) for entry in layout.entries}
    validate_tensors(tensors, schema, factors, max_abs=max_abs)
    return DecodedAdapter(tensors=tensors, metadata=layout.metadata)


# safetensors' dtypes and their bits per element (those outside WIRE_DTYPES are readable, and
# refused as a SchemaError; a name outside this table is unreadable, as safetensors has it).
_SAFETENSORS_BITS: Mapping[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}  # fmt: skip
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors header: its bytes are ``data[begin:end]`` of the buffer."""

    key: str
    dtype_name: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Layout:
    entries: list[_Entry]  # in data order
    metadata: dict[str, str]


def _unreadable(view: memoryview, why: str) -> CodecError:
    return CodecError(f"unreadable safetensors data ({len(view)} bytes): {why}")


def _layout_of(view: memoryview) -> _Layout:
    """The header of safetensors bytes, checked as safetensors checks it: the 8-byte length
    within the data (at most 100 MB), a UTF-8 JSON object, each tensor a known dtype, a shape
    of non-negative integers and ``data_offsets`` that tile the data after the header from its
    first byte to its last, in order, each exactly the tensor's size."""
    if len(view) < _HEADER_LENGTH_BYTES:
        raise _unreadable(view, "shorter than the 8-byte header length")
    length = int.from_bytes(view[:_HEADER_LENGTH_BYTES], "little")
    if length > _MAX_HEADER_BYTES or _HEADER_LENGTH_BYTES + length > len(view):
        raise _unreadable(view, f"header length {length} does not fit")
    header = _header_of(view[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + length])
    if not isinstance(header, dict):
        raise CodecError("unreadable safetensors header: not a JSON object")
    metadata = _metadata_of(header)
    entries = sorted((_entry_of(key, value) for key, value in header.items()
                      if key != "__metadata__"), key=lambda e: (e.begin, e.end))  # fmt: skip
    base = _HEADER_LENGTH_BYTES + length
    data_end = 0
    for entry in entries:
        if entry.begin != data_end or entry.end < entry.begin:
            raise _unreadable(view, f"invalid offsets for tensor {entry.key!r}")
        bits = math.prod(entry.shape) * _SAFETENSORS_BITS[entry.dtype_name]
        if bits % 8 or entry.end - entry.begin != bits // 8:
            size = entry.end - entry.begin
            raise _unreadable(view, f"tensor {entry.key!r}: {size} bytes do not hold "
                                    f"{entry.dtype_name} {_shape(entry.shape)}")  # fmt: skip
        data_end = entry.end
    if base + data_end != len(view):
        raise _unreadable(view, f"the tensors end at byte {base + data_end}, not at the end")
    shifted = [_Entry(e.key, e.dtype_name, e.shape, base + e.begin, base + e.end) for e in entries]
    return _Layout(shifted, metadata)


def _entry_of(key: str, value: object) -> _Entry:
    """One tensor's header entry, its fields typed as safetensors requires."""
    if not isinstance(value, dict):
        raise CodecError(f"unreadable safetensors header: entry {key!r} is not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_BITS:
        raise CodecError(f"unreadable safetensors header: {key!r} has unknown dtype {dtype!r}")
    if not (_naturals(shape) and _naturals(offsets) and len(offsets) == 2):
        raise CodecError(f"unreadable safetensors header: {key!r} has shape {shape!r}, "
                         f"data_offsets {offsets!r}")  # fmt: skip
    begin, end = offsets
    return _Entry(_text(key), dtype, tuple(shape), begin, end)


def _naturals(value: object) -> TypeGuard[list[int]]:
    """Whether ``value`` is a JSON list of non-negative integers (a usize list to serde)."""
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**64 for n in value
    )


def _text(value: str) -> str:
    """``value`` if it is valid Unicode (JSON's escapes can spell lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CodecError(f"unreadable safetensors header: invalid string {value!r}") from None
    return value


def _tensor_of(data: memoryview, entry: _Entry) -> Tensor:
    """The tensor ``entry`` describes, a view of writable ``data`` (a copy of its bytes when
    they are not aligned to its dtype); SchemaError for a dtype outside WIRE_DTYPES."""
    dtype = WIRE_DTYPES.get(entry.dtype_name)
    if dtype is None:
        raise SchemaError(
            f"{entry.key}: safetensors dtype {entry.dtype_name} with shape {_shape(entry.shape)} "
            "is not one of float32, float16, bfloat16",
            key=entry.key,
        )
    count = math.prod(entry.shape)
    if count == 0:  # torch.frombuffer refuses an empty buffer
        return torch.empty(entry.shape, dtype=dtype)
    if entry.begin % dtype.itemsize:
        data, begin = memoryview(bytearray(data[entry.begin : entry.end])), 0
    else:
        begin = entry.begin
    return torch.frombuffer(data, dtype=dtype, count=count, offset=begin).reshape(entry.shape)


def tensor_names(data: Buffer) -> frozenset[str]:
    """The tensor keys that safetensors bytes declare, from the JSON header alone: nothing is
    built or checked (that is :func:`decode_adapter`'s job); :class:`CodecError` when there is
    no readable header."""
    view = memoryview(data).cast("B")
    length = int.from_bytes(view[:_HEADER_LENGTH_BYTES], "little")
    header = _header_of(view[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + length])
    if not isinstance(header, dict):
        raise CodecError("unreadable safetensors header: not a JSON object")
    return frozenset(key for key in header if key != "__metadata__")


def _header_of(raw: memoryview) -> object:
    """The JSON of a safetensors header: strict UTF-8, no NaN or Infinity."""
    try:
        return json.loads(str(raw, "utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"unreadable safetensors header: {exc}") from exc


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _metadata_of(header: dict[str, object]) -> dict[str, str]:
    """The ``__metadata__`` of a header: absent, null, or strings to strings."""
    metadata = header.get("__metadata__")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CodecError("unreadable safetensors header: __metadata__ must map strings to strings")
    return {_text(k): _text(v) for k, v in metadata.items()}


def validate_tensors(
    tensors: Mapping[str, Tensor],
    schema: AdapterSchema | None = None,
    factors: Iterable[Factor] = BOTH_FACTORS,
    *,
    max_abs: float | None = None,
) -> None:
    """Refuse, with a :class:`SchemaError` naming the key and the shapes, a bad upload.

    With ``schema``: keys must be exactly ``schema.expected_shapes(factors)`` (no missing, no
    extra), each with its shape (a LoRA factor's rank dimension is reported as a rank
    mismatch). Without a schema: only factors in ``factors`` may appear, every module must hold
    all of them, A is ``(r, d_in)`` and B ``(d_out, r)`` with one ``r`` for all modules. In both
    cases every tensor must be float32/float16/bfloat16, non-empty and finite, and with
    ``max_abs`` no larger than that in absolute value.
    """
    wanted = frozenset(factors)
    if not tensors:
        raise SchemaError("adapter holds no tensors")
    if schema is None:
        _check_pairs(tensors, wanted)
    else:
        _check_keys(tensors, schema, wanted)
        _check_shapes(tensors, schema.expected_shapes(wanted), schema.rank)
    for key in sorted(tensors):
        _check_values(key, tensors[key], max_abs)


def _check_keys(
    tensors: Mapping[str, Tensor], schema: AdapterSchema, wanted: frozenset[Factor]
) -> None:
    expected = schema.expected_shapes(wanted)
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        key = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SchemaError(
            f"missing key {key} (expected shape {_shape(expected[key])}){more}", key=key
        )
    extra = sorted(tensors.keys() - expected.keys())
    if extra:
        key = extra[0]
        why = _why_unexpected(key, schema, wanted)
        raise SchemaError(
            f"unexpected key {key} with shape {_shape(tensors[key].shape)}{why}", key=key
        )


def _why_unexpected(key: str, schema: AdapterSchema, wanted: frozenset[Factor]) -> str:
    for which in Factor:
        if key.endswith(which.suffix) and key[: -len(which.suffix)] in schema.modules:
            if which not in wanted:
                return f": factor {which} is not part of this upload"
    return ": not in the adapter schema"


def _check_shapes(
    tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], rank: int
) -> None:
    for key in sorted(expected):
        got, want = tuple(tensors[key].shape), tuple(expected[key])
        if got == want:
            continue
        message = f"{key}: shape {_shape(got)}, expected {_shape(want)}"
        got_rank = _rank_of(key, got)
        if got_rank is not None and got_rank != rank:
            message += f" (rank {got_rank}, expected rank {rank})"
        raise SchemaError(message, key=key)


def _rank_of(key: str, shape: tuple[int, ...]) -> int | None:
    """The rank a LoRA factor's shape implies: rows of A, columns of B; None otherwise."""
    if len(shape) != 2:
        return None
    if key.endswith(Factor.A.suffix):
        return shape[0]
    if key.endswith(Factor.B.suffix):
        return shape[1]
    return None


def _check_pairs(tensors: Mapping[str, Tensor], wanted: frozenset[Factor]) -> None:
    """Without a schema: each module holds exactly ``wanted``, its factors fit, one rank."""
    factors, _extra = split_state_dict(tensors)
    ranks: dict[int, str] = {}
    for module in sorted(factors):
        given = factors[module]
        _check_module_factors(module, given, wanted)
        for which, tensor in given.items():
            if tensor.ndim != 2:
                raise SchemaError(
                    f"{which.key(module)}: shape {_shape(tensor.shape)} is not 2-D",
                    key=which.key(module),
                )
        if len(given) == 2 and given[Factor.A].shape[0] != given[Factor.B].shape[1]:
            a_key, b_key = Factor.A.key(module), Factor.B.key(module)
            raise SchemaError(
                f"{b_key}: shape {_shape(given[Factor.B].shape)} does not fit {a_key} shape "
                f"{_shape(given[Factor.A].shape)} (rank {given[Factor.B].shape[1]} vs rank "
                f"{given[Factor.A].shape[0]})",
                key=b_key,
            )
        which = min(given)
        rank = int(given[which].shape[0 if which is Factor.A else 1])
        ranks.setdefault(rank, which.key(module))
    if len(ranks) > 1:
        (r1, k1), (r2, k2) = sorted(ranks.items())[:2]
        raise SchemaError(
            f"modules of different ranks: {k1} has rank {r1}, {k2} has rank {r2}", key=k2
        )


def _check_module_factors(
    module: str, given: Mapping[Factor, Tensor], wanted: frozenset[Factor]
) -> None:
    unexpected = sorted(given.keys() - wanted)
    if unexpected:
        key = unexpected[0].key(module)
        raise SchemaError(
            f"unexpected key {key}: factor {unexpected[0]} is not part of this upload", key=key
        )
    missing = sorted(wanted - given.keys())
    if missing:
        key = missing[0].key(module)
        present = next(iter(given.items()))
        raise SchemaError(
            f"missing key {key} (module {module} has {present[0].key(module)} with shape "
            f"{_shape(present[1].shape)})",
            key=key,
        )


def _check_values(key: str, tensor: Tensor, max_abs: float | None = None) -> None:
    if tensor.dtype not in ALLOWED_DTYPES:
        raise SchemaError(
            f"{key}: dtype {str(tensor.dtype).removeprefix('torch.')} with shape "
            f"{_shape(tensor.shape)} is not one of float32, float16, bfloat16",
            key=key,
        )
    if tensor.numel() == 0:
        raise SchemaError(f"{key}: shape {_shape(tensor.shape)} holds no values", key=key)
    low, high = (float(v) for v in torch.aminmax(tensor))  # one pass; NaN propagates
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int(tensor.numel() - torch.isfinite(tensor).sum().item())
        raise SchemaError(
            f"{key}: {bad} non-finite value(s) (NaN or Inf) of {tensor.numel()} in shape "
            f"{_shape(tensor.shape)}",
            key=key,
        )
    peak = max(-low, high)
    if max_abs is not None and peak > max_abs:
        raise SchemaError(
            f"{key}: a value of magnitude {peak:.3g} in shape {_shape(tensor.shape)} exceeds "
            f"the limit {max_abs:g}",
            key=key,
        )


def _shape(shape: Iterable[int]) -> str:
    """``(3, 384)``: a shape as the messages print it (also for 1-D: ``(5,)``)."""
    return str(tuple(int(n) for n in shape))


def encode_schema(schema: AdapterSchema) -> dict[str, object]:
    """``schema`` as plain JSON-ready data: ``{"rank", "modules": {m: [d_out, d_in]}, "extra"}``."""
    return {
        "rank": schema.rank,
        "modules": {m: list(shape) for m, shape in sorted(schema.modules.items())},
        "extra": {k: list(shape) for k, shape in sorted(schema.extra.items())},
    }


def decode_schema(data: Mapping[str, object]) -> AdapterSchema:
    """The inverse of :func:`encode_schema`; malformed data raises :class:`SchemaError`."""
    rank = data.get("rank")
    modules = data.get("modules")
    extra = data.get("extra", {})
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise SchemaError(f"schema rank must be a positive integer, got {rank!r}", key="rank")
    if not isinstance(modules, Mapping) or not isinstance(extra, Mapping):
        raise SchemaError("schema 'modules' and 'extra' must be objects")
    return AdapterSchema(
        rank=rank,
        modules={str(m): _dims(m, s, length=2) for m, s in modules.items()},  # type: ignore[misc]
        extra={str(k): _dims(k, s) for k, s in extra.items()},
    )


def _dims(key: object, value: object, length: int | None = None) -> tuple[int, ...]:
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value
    )
    if not ok or (length is not None and len(value) != length):  # type: ignore[arg-type]
        raise SchemaError(f"schema entry {key}: bad shape {value!r}", key=str(key))
    return tuple(value)  # type: ignore[arg-type]
