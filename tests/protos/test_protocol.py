"""The committed generated modules are fresh, and the contract follows the house rules."""

from __future__ import annotations

from pathlib import Path

from fedrot_proto import generate
from fedrot_proto.v1 import federation_pb2


def test_generated_modules_match_a_fresh_generation(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert len(written) == 3 * len(generate.proto_files())
    for fresh in written:
        committed = generate.PROTO_ROOT / fresh.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run `make protos`"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed} is stale: run `make protos` and commit the result"
        )


def test_every_enum_starts_with_unspecified() -> None:
    for enum in federation_pb2.DESCRIPTOR.enum_types_by_name.values():
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), f"{enum.name}: zero value is {zero}"


def test_every_rpc_has_its_own_request_and_response() -> None:
    service = federation_pb2.DESCRIPTOR.services_by_name["FederationService"]
    seen: set[str] = set()
    for method in service.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"
        seen.add(method.name)
    assert seen == {"Enroll", "GetTask", "DownloadAdapter", "UploadUpdate", "Heartbeat",
                    "QueryUpload", "DeclineRun"}


def test_package_is_versioned() -> None:
    assert federation_pb2.DESCRIPTOR.package == "fedrot.v1"
