"""The one codec: safetensors bytes <-> tensors in PEFT key naming, and their validation.

Every adapter that crosses a process boundary (a gRPC upload or broadcast, a file given to
``fedrot aggregate``) goes through :func:`encode_adapter` and :func:`decode_adapter`. The format
is safetensors: an 8-byte little-endian header length, a JSON header (tensor names, dtypes,
shapes, offsets, and string ``__metadata__``), then raw little-endian tensor data. Nothing here
unpickles: bytes from a peer are parsed by safetensors and checked before any tensor is built.

Keys are PEFT state-dict keys: ``<module>.lora_A.weight`` of shape ``(r, d_in)``,
``<module>.lora_B.weight`` of shape ``(d_out, r)``, and extra trainable tensors (a classifier
head) under their own keys. Accepted dtypes are float32, float16 and bfloat16; the round trip
keeps the dtype and every bit (bfloat16 included).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import safetensors
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


def decode_adapter(
    data: bytes | bytearray | memoryview,
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
    """
    raw = bytes(data)
    if not raw:
        raise CodecError("empty adapter: no bytes")
    if max_bytes is not None and len(raw) > max_bytes:
        raise CodecError(f"adapter of {len(raw)} bytes exceeds the limit of {max_bytes} bytes")
    tensors = _tensors_of(_deserialize(raw))
    metadata = _metadata_of(raw)
    validate_tensors(tensors, schema, factors, max_abs=max_abs)
    return DecodedAdapter(tensors=tensors, metadata=metadata)


def _deserialize(raw: bytes) -> list[tuple[str, dict[str, object]]]:
    """safetensors' parse of ``raw``; anything it raises becomes a :class:`CodecError`."""
    try:
        return safetensors.deserialize(raw)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - a Rust panic surfaces as a BaseException
        raise CodecError(f"unreadable safetensors data ({len(raw)} bytes): {exc}") from exc


def _tensors_of(entries: list[tuple[str, dict[str, object]]]) -> dict[str, Tensor]:
    """Build CPU tensors from safetensors entries, refusing dtypes outside fp32/fp16/bf16."""
    tensors: dict[str, Tensor] = {}
    for key, entry in entries:
        dtype_name = str(entry["dtype"])
        dtype = WIRE_DTYPES.get(dtype_name)
        shape = tuple(int(n) for n in entry["shape"])  # type: ignore[attr-defined]
        if dtype is None:
            raise SchemaError(
                f"{key}: safetensors dtype {dtype_name} with shape {_shape(shape)} is not one "
                "of float32, float16, bfloat16",
                key=key,
            )
        buffer = entry["data"]
        if not isinstance(buffer, bytearray):
            buffer = bytearray(buffer)  # type: ignore[arg-type]
        if len(buffer) == 0:  # torch.frombuffer refuses an empty buffer
            tensors[key] = torch.empty(shape, dtype=dtype)
        else:
            tensors[key] = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
    return tensors


def tensor_names(data: bytes | bytearray | memoryview) -> frozenset[str]:
    """The tensor keys that safetensors bytes declare, from the JSON header alone: nothing is
    built or checked (that is :func:`decode_adapter`'s job); :class:`CodecError` when there is
    no readable header."""
    header = _header_of(bytes(data))
    if not isinstance(header, dict):
        raise CodecError("unreadable safetensors header: not a JSON object")
    return frozenset(key for key in header if key != "__metadata__")


def _header_of(raw: bytes) -> object:
    """The JSON header of safetensors bytes (its length is the first 8 bytes, little-endian)."""
    length = int.from_bytes(raw[:_HEADER_LENGTH_BYTES], "little")
    try:
        return json.loads(raw[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + length])
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"unreadable safetensors header: {exc}") from exc


def _metadata_of(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a header that safetensors has already accepted."""
    header = _header_of(raw)
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CodecError("safetensors __metadata__ must map strings to strings")
    return dict(metadata)


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
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum().item())
        raise SchemaError(
            f"{key}: {bad} non-finite value(s) (NaN or Inf) of {tensor.numel()} in shape "
            f"{_shape(tensor.shape)}",
            key=key,
        )
    if max_abs is not None:
        peak = float(tensor.abs().max())
        if peak > max_abs:
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
