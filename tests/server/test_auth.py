"""Enrolment and authentication over real gRPC: good, bad, missing and revoked tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.storage.store import hash_token
from wire import WireClient, make_settings, running_server, synthetic_adapter, token_of


def status_of(call) -> grpc.StatusCode:  # noqa: ANN001
    return call.value.code()


def test_enrol_with_a_good_token_returns_the_run_spec(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice", "bob"], rounds=3,
                             strategy={"name": "fedrot", "alignment_strength": 0.25})  # fmt: skip
    initial = synthetic_adapter()

    async def scenario() -> None:
        async with running_server(settings, initial) as server:
            client = WireClient(server.address, token_of("alice"))
            response = await client.enroll(hostname="box")
            assert response.client_id == "alice"
            assert response.run_status == pb.RUN_STATUS_WAITING_FOR_CLIENTS
            run = response.run
            assert run.run_id == server.spec.run_id and run.rounds == 3
            assert run.model.name == "tiny-bert" and run.model.task == pb.MODEL_TASK_CLASSIFICATION
            assert run.model.fingerprint == "sha256:synthetic"
            assert run.lora.rank == 2 and run.lora.alpha == 4.0
            assert list(run.lora.target_modules) == ["query", "value"]
            assert run.strategy.name == "fedrot" and run.strategy.alignment_strength == 0.25
            assert run.schema.rank == 2
            assert {m.name: (m.d_out, m.d_in) for m in run.schema.modules} == dict(
                initial_shapes(initial)
            )
            assert {e.key: tuple(e.shape) for e in run.schema.extra} == {
                k: tuple(t.shape) for k, t in initial.extra.items()
            }
            assert run.limits.max_chunk_bytes == 4 * 1024 * 1024
            assert [c.name for c in server.store.clients(run.run_id)] == ["alice"]
            assert server.store.clients(run.run_id)[0].info == {"hostname": "box"}
            await client.close()

    asyncio.run(scenario())


def initial_shapes(adapter):  # noqa: ANN001, ANN201
    return {m: pair.shape for m, pair in adapter.lora.items()}


@pytest.mark.parametrize(
    "token",
    [None, "not-a-known-token-123456", ""],
    ids=["missing", "unknown", "empty"],
)
def test_enrol_without_a_valid_token_is_unauthenticated(tmp_path: Path, token: str | None) -> None:
    settings = make_settings(tmp_path, ["alice"])

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            client = WireClient(server.address, token)
            with pytest.raises(grpc.aio.AioRpcError) as call:
                await client.enroll()
            assert status_of(call) is grpc.StatusCode.UNAUTHENTICATED
            # Every other call is guarded the same way.
            with pytest.raises(grpc.aio.AioRpcError) as call:
                await client.get_task(max_wait_s=0)
            assert status_of(call) is grpc.StatusCode.UNAUTHENTICATED
            assert server.store.clients(server.spec.run_id) == []
            await client.close()

    asyncio.run(scenario())


def test_malformed_authorization_header_is_unauthenticated(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"])

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            client = WireClient(server.address, None)
            with pytest.raises(grpc.aio.AioRpcError) as call:
                await client.stub.Enroll(pb.EnrollRequest(),
                                         metadata=(("authorization", token_of("alice")),))  # fmt: skip
            assert status_of(call) is grpc.StatusCode.UNAUTHENTICATED
            await client.close()

    asyncio.run(scenario())


def test_revoked_client_is_permission_denied(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice", "bob"])

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            client = WireClient(server.address, token_of("bob"))
            await client.enroll()
            server.store.revoke_client("bob")
            with pytest.raises(grpc.aio.AioRpcError) as call:
                await client.get_task(max_wait_s=0)
            assert status_of(call) is grpc.StatusCode.PERMISSION_DENIED
            await client.close()

    asyncio.run(scenario())


def test_calls_before_enrolment_are_not_found(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"])

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            client = WireClient(server.address, token_of("alice"), run_id=server.spec.run_id)
            with pytest.raises(grpc.aio.AioRpcError) as call:
                await client.get_task(max_wait_s=0)
            assert status_of(call) is grpc.StatusCode.NOT_FOUND
            await client.enroll()
            client.run_id = "run-other"
            with pytest.raises(grpc.aio.AioRpcError) as call:
                await client.get_task(max_wait_s=0)
            assert status_of(call) is grpc.StatusCode.FAILED_PRECONDITION
            await client.close()

    asyncio.run(scenario())


def test_tokens_are_stored_hashed_only(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["alice"])

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()):
            pass

    asyncio.run(scenario())
    raw = settings.database_path.read_bytes()
    for path in settings.state_dir.rglob("*"):
        if path.is_file():
            assert token_of("alice").encode() not in path.read_bytes(), path
    assert hash_token(token_of("alice")).encode() in raw


def test_health_service_reports_serving(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = make_settings(tmp_path, ["alice"])

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for service in ("", "fedrot.v1.FederationService"):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(scenario())


@pytest.mark.parametrize("info", [{f"k{i}": "v" for i in range(33)}, {"hostname": "x" * 257}],
                         ids=["too many entries", "too long"])  # fmt: skip
def test_oversized_enrolment_info_is_refused(tmp_path: Path, info: dict[str, str]) -> None:
    settings = make_settings(tmp_path, ["alice"])

    async def scenario() -> None:
        async with running_server(settings, synthetic_adapter()) as server:
            client = WireClient(server.address, token_of("alice"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.enroll(**info)
            assert status_of(refused) is grpc.StatusCode.INVALID_ARGUMENT
            assert server.store.clients(server.spec.run_id) == []
            await client.close()

    asyncio.run(scenario())
