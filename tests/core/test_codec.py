"""The codec: exact safetensors round trips, validation that names the key, robustness to garbage."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrot.adapters import Adapter, AdapterSchema, Factor
from fedrot.codec import (
    ALLOWED_DTYPES,
    decode_adapter,
    decode_schema,
    encode_adapter,
    encode_schema,
    tensor_names,
    validate_tensors,
)
from fedrot.errors import CodecError, SchemaError

Q = "base_model.model.encoder.layer.0.attention.self.query"
V = "base_model.model.encoder.layer.0.attention.self.value"
HEAD = "base_model.model.classifier.weight"
SCHEMA = AdapterSchema(rank=4, modules={Q: (6, 8), V: (6, 8)}, extra={HEAD: (2, 6)})


def tensors_for(schema: AdapterSchema, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random tensors with exactly the keys and shapes ``schema`` expects."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=generator).to(dtype)
        for key, shape in schema.expected_shapes().items()
    }


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor, so that comparisons are bitwise."""
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return tensor.contiguous().view(view[tensor.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bitwise_exact_and_keeps_dtype_and_metadata(dtype: torch.dtype) -> None:
    tensors = tensors_for(SCHEMA, dtype)
    tensors[HEAD][0, 0] = -0.0  # a signed zero survives bit for bit, not just by value
    metadata = {"round": "3", "strategy": "fedrot", "note": "ünïcode ok"}

    decoded = decode_adapter(encode_adapter(tensors, metadata), SCHEMA)

    assert decoded.metadata == metadata
    assert decoded.tensors.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert decoded.tensors[key].dtype == dtype
        assert decoded.tensors[key].device.type == "cpu"
        assert torch.equal(bits(decoded.tensors[key]), bits(tensor)), key


def test_mixed_dtypes_non_contiguous_and_shared_storage_round_trip() -> None:
    base = torch.randn(8, 4)
    tensors = {
        Factor.A.key(Q): base.t(),  # non-contiguous view, (4, 8)
        Factor.B.key(Q): base[:6].clone().to(torch.bfloat16),
        Factor.A.key(V): base.t()[:, :],  # shares storage with the first
        Factor.B.key(V): torch.randn(6, 4, dtype=torch.float16),
        HEAD: torch.randn(2, 6),
    }
    decoded = decode_adapter(encode_adapter(tensors), SCHEMA)
    for key, tensor in tensors.items():
        assert torch.equal(decoded.tensors[key], tensor), key
        assert decoded.tensors[key].dtype == tensor.dtype
    assert decoded.metadata == {}


def test_decoded_tensors_are_writable_and_build_an_adapter() -> None:
    decoded = decode_adapter(encode_adapter(tensors_for(SCHEMA)))
    decoded.tensors[HEAD].add_(1.0)  # owned memory, not a read-only view of the input bytes
    adapter = decoded.to_adapter()
    assert isinstance(adapter, Adapter)
    assert AdapterSchema.of(adapter) == SCHEMA


def test_partial_upload_of_one_factor() -> None:
    only_b = {k: t for k, t in tensors_for(SCHEMA).items() if not k.endswith(Factor.A.suffix)}
    decoded = decode_adapter(encode_adapter(only_b), SCHEMA, factors={Factor.B})
    assert decoded.tensors.keys() == only_b.keys()
    decode_adapter(encode_adapter(only_b), None, factors={Factor.B})

    with pytest.raises(SchemaError, match="factor A is not part of this upload") as info:
        decode_adapter(encode_adapter(tensors_for(SCHEMA)), SCHEMA, factors={Factor.B})
    assert info.value.key == Factor.A.key(Q)
    with pytest.raises(SchemaError, match="factor A is not part of this upload"):
        decode_adapter(encode_adapter(tensors_for(SCHEMA)), None, factors={Factor.B})


def test_encode_refuses_non_string_metadata() -> None:
    with pytest.raises(TypeError, match="round"):
        encode_adapter(tensors_for(SCHEMA), {"round": 3})  # type: ignore[dict-item]


def test_schema_travels_as_json() -> None:
    wire = json.loads(json.dumps(encode_schema(SCHEMA)))
    assert wire["rank"] == 4 and wire["modules"][Q] == [6, 8]
    assert decode_schema(wire) == SCHEMA


@pytest.mark.parametrize(
    "bad",
    [
        {"modules": {}},
        {"rank": 0, "modules": {}},
        {"rank": True, "modules": {}},
        {"rank": 2, "modules": {Q: [6]}},
        {"rank": 2, "modules": {Q: [6, -1]}},
        {"rank": 2, "modules": {Q: "6x8"}},
        {"rank": 2, "modules": [Q]},
        {"rank": 2, "modules": {}, "extra": {HEAD: [2.5]}},
    ],
)
def test_decode_schema_refuses_malformed_data(bad: dict) -> None:
    with pytest.raises(SchemaError):
        decode_schema(bad)


# ---- validation: every refusal is a SchemaError whose message names the key ----------------


def _without(key: str) -> dict[str, torch.Tensor]:
    tensors = tensors_for(SCHEMA)
    del tensors[key]
    return tensors


def _with(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**tensors_for(SCHEMA), key: value}


def _poisoned(key: str, value: float, count: int) -> dict[str, torch.Tensor]:
    tensors = tensors_for(SCHEMA)
    tensors[key].view(-1)[:count] = value
    return tensors


REFUSALS = {
    "missing factor": (_without(Factor.B.key(V)), Factor.B.key(V), r"missing key .*\(6, 4\)"),
    "missing extra": (_without(HEAD), HEAD, "missing key"),
    "extra key": (_with("base_model.model.pooler.weight", torch.ones(3)), "base_model.model.pooler.weight", "unexpected key"),
    "extra module": (_with(Factor.A.key("m.k"), torch.ones(4, 8)), Factor.A.key("m.k"), "unexpected key"),
    "shape": (_with(Factor.A.key(Q), torch.ones(4, 7)), Factor.A.key(Q), r"shape \(4, 7\), expected \(4, 8\)"),
    "rank of A": (_with(Factor.A.key(Q), torch.ones(3, 8)), Factor.A.key(Q), r"shape \(3, 8\), expected \(4, 8\) \(rank 3, expected rank 4\)"),
    "rank of B": (_with(Factor.B.key(V), torch.ones(6, 5)), Factor.B.key(V), "rank 5, expected rank 4"),
    "head shape": (_with(HEAD, torch.ones(3, 6)), HEAD, r"shape \(3, 6\), expected \(2, 6\)"),
    "int64": (_with(HEAD, torch.ones(2, 6, dtype=torch.int64)), HEAD, "dtype"),
    "float64": (_with(Factor.A.key(Q), torch.ones(4, 8, dtype=torch.float64)), Factor.A.key(Q), "dtype"),
    "NaN": (_poisoned(Factor.B.key(Q), float("nan"), 3), Factor.B.key(Q), "3 non-finite"),
    "+Inf": (_poisoned(HEAD, float("inf"), 1), HEAD, "1 non-finite"),
    "-Inf": (_poisoned(Factor.A.key(V), float("-inf"), 2), Factor.A.key(V), "2 non-finite"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
@pytest.mark.parametrize("through", ["validate", "decode"])
def test_every_schema_violation_is_refused_naming_the_key(case: str, through: str) -> None:
    tensors, key, pattern = REFUSALS[case]
    with pytest.raises(SchemaError, match=pattern) as info:
        if through == "validate":
            validate_tensors(tensors, SCHEMA)
        else:
            decode_adapter(safetensors.torch.save(tensors), SCHEMA)
    assert info.value.key == key
    assert key in str(info.value)


NO_SCHEMA_REFUSALS = {
    "lone A": (_without(Factor.B.key(V)), Factor.B.key(V), "missing key"),
    "A/B rank disagree": (_with(Factor.A.key(Q), torch.ones(3, 8)), Factor.B.key(Q), "rank 4 vs rank 3"),
    "modules of two ranks": (
        {**_with(Factor.A.key(Q), torch.ones(3, 8)), Factor.B.key(Q): torch.ones(6, 3)},
        Factor.A.key(V),
        "different ranks",
    ),
    "1-D factor": (_with(Factor.A.key(Q), torch.ones(32)), Factor.A.key(Q), "not 2-D"),
    "bf16 NaN": (_with(HEAD, torch.full((2, 6), float("nan"), dtype=torch.bfloat16)), HEAD, "12 non-finite"),
    "fp16 Inf": (_with(HEAD, torch.full((2, 6), 1e6).to(torch.float16)), HEAD, "non-finite"),
    "int32": (_with(HEAD, torch.ones(2, 6, dtype=torch.int32)), HEAD, "dtype"),
    "empty": (_with(HEAD, torch.ones(0, 6)), HEAD, "holds no values"),
}


@pytest.mark.parametrize("case", NO_SCHEMA_REFUSALS, ids=list(NO_SCHEMA_REFUSALS))
def test_without_schema_pairs_ranks_dtypes_and_values_are_still_checked(case: str) -> None:
    tensors, key, pattern = NO_SCHEMA_REFUSALS[case]
    with pytest.raises(SchemaError, match=pattern) as info:
        validate_tensors(tensors)
    assert info.value.key == key
    assert key in str(info.value)


def test_no_tensors_at_all_is_refused() -> None:
    with pytest.raises(SchemaError, match="no tensors"):
        decode_adapter(safetensors.torch.save({}))


# ---- unreadable bytes are a CodecError ------------------------------------------------------

GOOD = encode_adapter(tensors_for(SCHEMA), {"round": "1"})


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        GOOD[:7],
        GOOD[:8],
        GOOD[:40],
        GOOD[:-1],
        GOOD + b"\x00",
        (10**9).to_bytes(8, "little") + GOOD[8:],
        GOOD[:8] + b"[" + GOOD[9:],
        GOOD[:8] + b"\xff" * 16 + GOOD[24:],
        b"PK\x03\x04 not a safetensors file at all, maybe a zip or a pickle",
    ],
    ids=[
        "empty",
        "one byte",
        "short length",
        "length only",
        "truncated header",
        "truncated data",
        "trailing byte",
        "huge header length",
        "header not an object",
        "header not utf-8",
        "garbage",
    ],
)
def test_unreadable_bytes_raise_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_adapter(data, SCHEMA)


def _with_header(header: dict) -> bytes:
    body = json.dumps(header).encode()
    data_len = max([e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"] + [0])
    return len(body).to_bytes(8, "little") + body + b"\x00" * data_len


@pytest.mark.parametrize(
    "header",
    [
        {HEAD: {"dtype": "F32", "shape": [2, 6], "data_offsets": [0, 40]}},
        {HEAD: {"dtype": "F32", "shape": [2, 6], "data_offsets": [8, 56]}},
        {HEAD: {"dtype": "F32", "shape": [2, 6], "data_offsets": [48, 0]}},
        {HEAD: {"dtype": "F32", "shape": [-2, 6], "data_offsets": [0, 48]}},
        {HEAD: {"dtype": "XX", "shape": [2, 6], "data_offsets": [0, 48]}},
        {"__metadata__": {"round": 1}, HEAD: {"dtype": "F32", "shape": [2, 6], "data_offsets": [0, 48]}},
    ],
    ids=["size mismatch", "gap at start", "reversed offsets", "negative dim", "unknown dtype", "metadata not str"],
)
def test_inconsistent_headers_raise_codec_error(header: dict) -> None:
    with pytest.raises(CodecError):
        decode_adapter(_with_header(header))


def test_size_limit() -> None:
    assert decode_adapter(GOOD, max_bytes=len(GOOD)).metadata == {"round": "1"}
    with pytest.raises(CodecError, match="exceeds the limit"):
        decode_adapter(GOOD, max_bytes=len(GOOD) - 1)


MUTATION = st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    mutations=st.lists(MUTATION, min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
    with_schema=st.booleans(),
)
def test_mutated_bytes_give_codec_or_schema_error_or_a_valid_adapter(
    dtype: torch.dtype, mutations: list[tuple[int, int]], cut: int | None, with_schema: bool
) -> None:
    data = bytearray(encode_adapter(tensors_for(SCHEMA, dtype), {"round": "1"}))
    for position, value in mutations:
        data[position % len(data)] = value
    if cut is not None:
        del data[cut % len(data) :]
    schema = SCHEMA if with_schema else None
    try:
        decoded = decode_adapter(bytes(data), schema)
    except (CodecError, SchemaError):
        return
    for key, tensor in decoded.tensors.items():
        assert tensor.dtype in ALLOWED_DTYPES, key
        assert bool(torch.isfinite(tensor).all()), key
    if schema is not None:
        assert {k: tuple(t.shape) for k, t in decoded.tensors.items()} == SCHEMA.expected_shapes()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in decoded.metadata.items())


def test_tensor_names_come_from_the_header_alone() -> None:
    tensors = {"m.q.lora_A.weight": torch.ones(2, 3), "head.weight": torch.zeros(4)}
    data = encode_adapter(tensors, {"round": "1"})
    assert tensor_names(data) == {"m.q.lora_A.weight", "head.weight"}
    with pytest.raises(CodecError, match="unreadable safetensors header"):
        tensor_names(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")


def _safetensors_reads(data: bytes) -> list[tuple[str, dict]] | None:
    """safetensors' own parse of ``data`` (None: it refuses the bytes)."""
    try:
        return safetensors.deserialize(data)
    except Exception:  # noqa: BLE001 - any refusal counts
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    mutations=st.lists(MUTATION, min_size=0, max_size=4),
    header_only=st.booleans(),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_the_codec_reads_exactly_what_safetensors_reads(
    dtype: torch.dtype, mutations: list[tuple[int, int]], header_only: bool, cut: int | None
) -> None:
    """Differential: the codec's own parser (zero-copy views) refuses as unreadable exactly the
    bytes safetensors refuses, and reads the same tensors, bit for bit, from the rest."""
    data = bytearray(encode_adapter(tensors_for(SCHEMA, dtype), {"round": "1"}))
    header_end = 8 + int.from_bytes(data[:8], "little")
    for position, value in mutations:
        data[position % (header_end if header_only else len(data))] = value
    if cut is not None:
        del data[cut % len(data) :]
    reference = _safetensors_reads(bytes(data))
    try:
        decoded = decode_adapter(bytearray(data))
    except CodecError:
        assert reference is None, reference
        return
    except SchemaError:
        assert reference is not None
        return
    assert reference is not None
    assert decoded.tensors.keys() == {key for key, _ in reference}
    for key, entry in reference:
        got = decoded.tensors[key]
        assert list(got.shape) == entry["shape"]
        assert got.contiguous().view(torch.uint8).flatten().tolist() == list(entry["data"]), key


def test_a_writable_buffer_is_read_without_a_copy() -> None:
    data = bytearray(encode_adapter(tensors_for(SCHEMA), {"round": "1"}))
    decoded = decode_adapter(data, SCHEMA)
    start = memoryview(data).cast("B")
    address = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    for tensor in decoded.tensors.values():
        assert address <= tensor.data_ptr() < address + len(start)
    frozen = decode_adapter(bytes(data), SCHEMA)  # read-only bytes: one private copy
    assert all(not address <= t.data_ptr() < address + len(start) for t in frozen.tensors.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("size", [1, 7, 64, 4099])
def test_one_non_finite_value_anywhere_is_refused(dtype: torch.dtype, bad: float, size: int) -> None:
    """The one-pass check (aminmax, NaN propagating) finds a single bad value at any position
    of tensors of every length (vectorised body and scalar tail)."""
    for position in sorted({0, size // 2, size - 1}):
        values = torch.linspace(-1, 1, size).to(dtype)
        values[position] = bad
        with pytest.raises(SchemaError, match="1 non-finite value"):
            validate_tensors({HEAD: values.reshape(1, size)}, None, max_abs=10.0)
