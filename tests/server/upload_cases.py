"""Damaged uploads for the servicer fuzz: the header, payload, stream and identity faults,
each with the status it calls for. Importable as ``upload_cases`` from the tests in this folder.

The fuzzed federation (see ``test_upload_fuzz.py``): alice and bob train in round 0; carol
enrolled after the round opened (not a participant); mallory enrolled, then was revoked; dave
holds a token but never enrolled. Uploads above :data:`LIMIT` bytes are too large: the smaller of
the server's ``max_upload_bytes`` (:data:`CAP`) and the largest encoded update of the schema.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc
from hypothesis import strategies as st

from fedrot.adapters import AdapterSchema, Factor
from fedrot.codec import decode_adapter, max_encoded_size
from fedrot.errors import FedRotError
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.settings import DEFAULT_MAX_UPLOAD_VALUE
from mutations import Fault, payload_faults, tensor_faults
from wire import FACTOR_NUMBERS, encode_update, local_update, synthetic_adapter, token_of

BOTH = frozenset(Factor)
CAP = 64 * 1024  # max_upload_bytes of the fuzzed server
Code = grpc.StatusCode
NON_FINITE = (float("nan"), float("inf"), float("-inf"))

INITIAL = synthetic_adapter()
SCHEMA = AdapterSchema.of(INITIAL)
UPDATE = local_update(INITIAL, BOTH, seed=1)
GOOD = encode_update(UPDATE)
LIMIT = min(CAP, max_encoded_size(SCHEMA, BOTH))


@dataclass(frozen=True)
class Upload:
    """One upload attempt: who sends it, the header fields, the payload and how it is chunked."""

    metadata: tuple[tuple[str, str], ...]
    header: dict[str, Any]
    payload: bytes
    chunks: tuple[int, ...]  # chunk sizes, summing to len(payload)
    stream: Callable[[list[pb.UploadUpdateRequest]], list[pb.UploadUpdateRequest]] | None = None

    def messages(self) -> list[pb.UploadUpdateRequest]:
        out = [pb.UploadUpdateRequest(header=pb.UploadHeader(**self.header))]
        offset = 0
        for size in self.chunks:
            data = self.payload[offset : offset + size]
            out.append(pb.UploadUpdateRequest(chunk=pb.Chunk(offset=offset, data=data)))
            offset += size
        return self.stream(out) if self.stream else out


@dataclass(frozen=True)
class Case:
    upload: Upload
    expected: frozenset[Code]
    why: str


def good_upload(run_id: str, payload: bytes, sizes: list[int]) -> Upload:
    header = {"run_id": run_id, "round": 0, "sample_count": 10, "metrics": {"train_loss": 0.5},
              "total_size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
              "idempotency_key": uuid.uuid4().hex,
              "factors": [FACTOR_NUMBERS[f] for f in sorted(BOTH)]}  # fmt: skip
    metadata = (("authorization", f"Bearer {token_of('alice')}"),)
    return Upload(metadata, header, payload, chunking(len(payload), sizes))


def chunking(total: int, sizes: list[int]) -> tuple[int, ...]:
    """Chunk sizes from the drawn ``sizes`` (cycled), covering ``total`` bytes exactly."""
    out, left, i = [], total, 0
    while left > 0:
        size = min(left, max(1, sizes[i % len(sizes)] if sizes else left))
        out.append(size)
        left -= size
        i += 1
    return tuple(out)


def header_faults() -> st.SearchStrategy[tuple[str, Any, Code]]:
    """``(field, bad value, status)``."""
    text = st.text(max_size=40)
    hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
    bad_factors = st.lists(st.sampled_from([0, 1, 2, 3, 99]), max_size=4).filter(
        lambda f: set(f) != {1, 2}
    )
    bad_metrics = st.one_of(
        st.dictionaries(st.text(min_size=1, max_size=8), st.sampled_from(NON_FINITE), min_size=1),
        st.just({"": 1.0}), st.just({"m" * 65: 1.0}),
        st.just({f"m{i}": 1.0 for i in range(65)}),
    )  # fmt: skip
    def fault(field: str, values: st.SearchStrategy[Any], code: Code) -> st.SearchStrategy:
        return st.tuples(st.just(field), values, st.just(code))

    invalid = Code.INVALID_ARGUMENT
    return st.one_of(
        fault("run_id", text.filter(lambda s: not s.startswith("run")), Code.FAILED_PRECONDITION),
        fault("round", st.integers(1, 2**32 - 1), Code.FAILED_PRECONDITION),
        fault("sample_count", st.sampled_from([0, 2**53 + 1, 2**63, 2**64 - 1]), invalid),
        fault("factors", bad_factors, invalid),
        fault("sha256", hex64 | text, invalid),
        fault("total_size", st.integers(0, LIMIT), invalid),
        fault("total_size", st.integers(LIMIT + 1, 2**64 - 1), Code.RESOURCE_EXHAUSTED),
        fault("idempotency_key", st.sampled_from(["", "k" * 129]), invalid),
        fault("metrics", bad_metrics, invalid),
    )


def _swap(chunks: list, i: int, j: int) -> list:
    n = len(chunks)
    if n < 2:
        return _duplicate(chunks, i, j)
    a, b = i % n, j % n if j % n != i % n else (i + 1) % n
    chunks[a], chunks[b] = chunks[b], chunks[a]
    return chunks


def _duplicate(chunks: list, i: int, _j: int) -> list:
    chunks.insert(i % len(chunks) + 1, chunks[i % len(chunks)])
    return chunks


def _drop(chunks: list, i: int, _j: int) -> list:
    del chunks[i % len(chunks)]
    return chunks


def _shift(chunks: list, i: int, j: int) -> list:
    moved = pb.UploadUpdateRequest()
    moved.CopyFrom(chunks[i % len(chunks)])
    delta = j + 1
    offset = moved.chunk.offset
    moved.chunk.offset = offset - delta if offset >= delta else offset + delta
    chunks[i % len(chunks)] = moved
    return chunks


def _insert(message: pb.UploadUpdateRequest) -> Callable[[list, int, int], list]:
    def apply(chunks: list, i: int, _j: int) -> list:
        chunks.insert(i % (len(chunks) + 1), message)
        return chunks

    return apply


def _tail(chunks: list, i: int, _j: int) -> list:
    last = chunks[-1].chunk
    data = b"\x00" * (1 + i % 9)
    end = last.offset + len(last.data)
    chunks.append(pb.UploadUpdateRequest(chunk=pb.Chunk(offset=end, data=data)))
    return chunks


STREAM_FAULTS: dict[str, Callable[[list, int, int], list]] = {
    "swap": _swap, "duplicate": _duplicate, "drop": _drop, "shift": _shift, "tail": _tail,
    "empty chunk": _insert(pb.UploadUpdateRequest(chunk=pb.Chunk(offset=0, data=b""))),
    "empty message": _insert(pb.UploadUpdateRequest()),
    "far chunk": _insert(pb.UploadUpdateRequest(chunk=pb.Chunk(offset=2**63, data=b"x"))),
}  # fmt: skip


def stream_faults() -> st.SearchStrategy[Fault]:
    """Damage to the message stream: order, duplicates, gaps, empty or foreign messages, a
    second header or none."""

    def build(kind: str, i: int, j: int) -> Fault:
        def apply(messages: list[pb.UploadUpdateRequest]) -> list[pb.UploadUpdateRequest]:
            head, chunks = messages[0], list(messages[1:])
            if kind == "no header":
                return chunks
            if kind == "second header":
                return [head, *_insert(head)(chunks, i, j)]
            damage = STREAM_FAULTS[kind] if chunks else STREAM_FAULTS["empty message"]
            return [head, *damage(chunks, i, j)]

        return Fault(f"stream {kind} ({i}, {j})", apply)

    kinds = st.sampled_from([*STREAM_FAULTS, "no header", "second header"])
    return st.builds(build, kinds, st.integers(0, 50), st.integers(0, 50))


IDENTITIES: dict[str, tuple[tuple[tuple[str, str], ...], Code]] = {
    "no token": ((), Code.UNAUTHENTICATED),
    "unknown token": ((("authorization", "Bearer not-a-token-0123456789"),), Code.UNAUTHENTICATED),
    "basic auth": ((("authorization", f"Basic {token_of('alice')}"),), Code.UNAUTHENTICATED),
    "revoked": ((("authorization", f"Bearer {token_of('mallory')}"),), Code.PERMISSION_DENIED),
    "never enrolled": ((("authorization", f"Bearer {token_of('dave')}"),), Code.NOT_FOUND),
    "not a participant": ((("authorization", f"Bearer {token_of('carol')}"),),
                          Code.FAILED_PRECONDITION),
}  # fmt: skip


def refused_payload(payload: bytes) -> Code | None:
    """The status a payload with a consistent header gets, or None if it is acceptable."""
    if len(payload) > LIMIT:
        return Code.RESOURCE_EXHAUSTED
    if not payload:
        return Code.INVALID_ARGUMENT
    try:
        decode_adapter(payload, SCHEMA, BOTH, max_abs=DEFAULT_MAX_UPLOAD_VALUE)
    except FedRotError:
        return Code.INVALID_ARGUMENT
    return None


def not_from_zero(messages: list[pb.UploadUpdateRequest]) -> bool:
    """Whether the chunk after the header starts elsewhere than at offset 0 (the server holds
    no bytes of a fresh upload to resume: OUT_OF_RANGE)."""
    return (len(messages) > 1 and messages[0].WhichOneof("part") == "header"
            and messages[1].WhichOneof("part") == "chunk" and messages[1].chunk.offset != 0)  # fmt: skip


@st.composite
def cases(draw: st.DrawFn, run_id: str) -> Case | None:
    """One damaged upload and the statuses it may get (None: the damage left it acceptable)."""
    sizes = draw(st.lists(st.integers(1, 2048), min_size=1, max_size=4))
    kinds = draw(st.lists(st.sampled_from(["payload", "header", "stream", "identity"]),
                          min_size=1, max_size=2, unique=True))  # fmt: skip
    upload, expected, why = good_upload(run_id, GOOD, sizes), set(), []
    if "payload" in kinds:
        fault = draw(st.one_of(payload_faults(), tensor_faults(UPDATE)))
        payload = fault.apply(GOOD)
        code = refused_payload(payload)
        if code is None:
            return None
        header = {**upload.header, "total_size": len(payload),
                  "sha256": hashlib.sha256(payload).hexdigest()}  # fmt: skip
        chunks = chunking(len(payload), sizes)
        upload = replace(upload, payload=payload, header=header, chunks=chunks)
        expected.add(code)
        why.append(fault.name)
    if "header" in kinds:
        field, value, code = draw(header_faults())
        if field == "total_size" and value == upload.header["total_size"]:
            value += 1
        if field == "sha256" and value == upload.header["sha256"]:
            value = "0" * 64
        upload = replace(upload, header={**upload.header, field: value})
        expected.add(code)
        why.append(f"header {field} = {value!r:.80}")
    if "stream" in kinds:
        fault = draw(stream_faults())
        upload = replace(upload, stream=fault.apply)
        expected.add(Code.INVALID_ARGUMENT)
        if not_from_zero(upload.messages()):
            expected.add(Code.OUT_OF_RANGE)
        why.append(fault.name)
    identity = draw(st.sampled_from(sorted(IDENTITIES))) if "identity" in kinds else None
    if identity is not None:
        metadata, code = IDENTITIES[identity]
        upload = replace(upload, metadata=metadata)
        expected.add(code)
        why.append(identity)
    return Case(upload, frozenset(expected), " + ".join(why))
