"""``max_encoded_size``: no update of a schema that the codec accepts encodes to more bytes, and
the bound is tight (beyond the stated header slack, a few bytes per tensor: the longest dtype
name and offsets of the most digits in each header entry)."""

from __future__ import annotations

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrot.adapters import AdapterSchema, Factor
from fedrot.codec import (
    HEADER_SLACK_BYTES,
    decode_adapter,
    encode_adapter,
    max_encoded_size,
)

# Beyond the slack, what a header entry's bound may exceed the real entry by: one byte of dtype
# name ("BF16" vs "F32") and the digits of two offsets (at most 20 each, as int64 does).
OVERESTIMATE_PER_TENSOR = 1 + 2 * 20
FACTOR_SETS = [frozenset(Factor), frozenset({Factor.A}), frozenset({Factor.B})]
SDK_METADATA = {"run_id": "run-0123456789ab", "round": "12", "client_id": "hospital-7",
                "factors": "AB"}  # fmt: skip

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)
dims = st.integers(1, 40)
schemas = st.builds(
    lambda rank, modules, extra: AdapterSchema(rank=rank, modules=modules, extra=extra),
    st.integers(1, 8),
    st.dictionaries(names.map(lambda n: f"base_model.model.{n}"), st.tuples(dims, dims),
                    min_size=1, max_size=4),
    st.dictionaries(names.map(lambda n: f"base_model.model.head.{n}"),
                    st.lists(dims, min_size=1, max_size=3).map(tuple), max_size=2),
)  # fmt: skip


def largest_update(schema: AdapterSchema, factors: frozenset[Factor]) -> dict[str, torch.Tensor]:
    """Every key an upload of ``factors`` must hold, in float32 (the widest accepted dtype)."""
    shapes = schema.expected_shapes(factors)
    return {key: torch.full(shape, -1.5e-38) for key, shape in shapes.items()}


def metadata_filling(slack: int) -> dict[str, str]:
    """A ``__metadata__`` whose header entry (``"__metadata__":{...},``) is ``slack`` bytes."""
    empty = len(json.dumps({"__metadata__": {"k": ""}}, separators=(",", ":"))) - 2 + 1
    return {"k": "x" * (slack - empty)}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas, factors=st.sampled_from(FACTOR_SETS))
def test_no_accepted_update_encodes_above_the_bound_and_the_bound_is_tight(
    schema: AdapterSchema, factors: frozenset[Factor]
) -> None:
    bound = max_encoded_size(schema, factors)
    tensors = largest_update(schema, factors)
    bare = encode_adapter(tensors)
    decode_adapter(bare, schema, factors)  # an acceptable update
    for metadata in (None, SDK_METADATA, metadata_filling(HEADER_SLACK_BYTES)):
        assert len(encode_adapter(tensors, metadata)) <= bound, metadata and len(str(metadata))
    for dtype in (torch.float16, torch.bfloat16):
        narrow = {key: tensor.to(dtype) for key, tensor in tensors.items()}
        assert len(encode_adapter(narrow, SDK_METADATA)) <= bound
    over = bound - HEADER_SLACK_BYTES - len(bare)
    assert 0 <= over <= OVERESTIMATE_PER_TENSOR * len(tensors)


def test_the_bound_follows_the_trained_factors_and_the_slack() -> None:
    schema = AdapterSchema(rank=4, modules={"m.q": (100, 30), "m.v": (50, 30)}, extra={"m.h": (3,)})
    data = {frozenset(Factor): 4 * (4 * 30 * 2 + 100 * 4 + 50 * 4 + 3),
            frozenset({Factor.A}): 4 * (4 * 30 * 2 + 3),
            frozenset({Factor.B}): 4 * (100 * 4 + 50 * 4 + 3)}  # fmt: skip
    for factors, data_bytes in data.items():
        bound = max_encoded_size(schema, factors)
        header = bound - data_bytes
        assert HEADER_SLACK_BYTES < header < HEADER_SLACK_BYTES + 100 * (len(factors) * 2 + 1)
        assert max_encoded_size(schema, factors, header_slack=0) == bound - HEADER_SLACK_BYTES
