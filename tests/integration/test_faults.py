"""Faults with a real server and real client processes: a client lost mid-round, bad tokens,
a different base model, SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest

from fedrot_client.tinybert import build_tiny_bert, build_tokenizer
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_proto.v1 import federation_pb2_grpc as pb_grpc
from fedrot_server.run_settings import Portion
from harness import HERE, CLIENT_NAMES, client_shards, token_of, tiny_settings

EXIT_REFUSED_TO_START = 2


def test_a_client_lost_mid_round_does_not_hold_the_round_past_its_deadline(
    start_server, clients, tmp_path: Path
) -> None:
    """carol dies after training round 1, before uploading; the round closes at its first
    deadline with the quorum of the other two, and the run ends."""
    shards = client_shards(tmp_path / "data", sizes=(16, 16, 16))
    server = start_server(tiny_settings(tmp_path / "server", quorum=Portion(count=2),
                                        round_deadline_s=8.0), evaluate=False)  # fmt: skip
    alive = [clients.start(name, server.address, shard)
             for name, shard in zip(CLIENT_NAMES[:2], shards, strict=False)]  # fmt: skip
    dying = clients.start("carol", server.address, shards[2], script=HERE / "dying_client.py",
                          env={"FEDROT_TEST_DIE_AT_ROUND": "1"})  # fmt: skip

    assert dying.wait() == 137
    assert [client.wait() for client in alive] == [0, 0], [c.log() for c in alive]
    server.wait_finished()
    summary = server.report(1)["summary"]
    assert "carol" in summary["participants"]
    assert sorted(summary["reporters"]) == ["alice", "bob"]
    assert summary["extensions"] == 0  # closed at its first deadline, not extended


@pytest.fixture
def idle_server(start_server, tmp_path: Path):
    """A server whose run never starts a round (it waits for 9 clients)."""
    return start_server(tiny_settings(tmp_path / "server", min_clients=9, max_task_wait_s=600.0),
                        evaluate=False)  # fmt: skip


@pytest.mark.parametrize("token", [None, "not-a-known-token-0123456789"])
def test_calls_without_a_valid_token_are_unauthenticated(idle_server, token: str | None) -> None:
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    run_id = idle_server.run_id
    with grpc.insecure_channel(idle_server.address) as channel:
        stub = pb_grpc.FederationServiceStub(channel)
        calls = {
            "Enroll": lambda: stub.Enroll(pb.EnrollRequest(), metadata=metadata, timeout=30),
            "GetTask": lambda: stub.GetTask(pb.GetTaskRequest(run_id=run_id), metadata=metadata,
                                            timeout=30),
            "Heartbeat": lambda: stub.Heartbeat(pb.HeartbeatRequest(run_id=run_id),
                                                metadata=metadata, timeout=30),
            "DownloadAdapter": lambda: list(stub.DownloadAdapter(
                pb.DownloadAdapterRequest(run_id=run_id), metadata=metadata, timeout=30)),
            "UploadUpdate": lambda: stub.UploadUpdate(iter([pb.UploadUpdateRequest(
                header=pb.UploadHeader(run_id=run_id, idempotency_key="k"))]),
                metadata=metadata, timeout=30),
        }  # fmt: skip
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, name


def test_a_client_with_a_different_base_model_refuses_to_start(
    idle_server, clients, tmp_path: Path
) -> None:
    other = tmp_path / "other-tiny-bert"
    build_tiny_bert(num_labels=4, seed=99).save_pretrained(other)
    build_tokenizer().save_pretrained(other)
    shard = client_shards(tmp_path / "data", sizes=(8,))[0]
    client = clients.start("alice", idle_server.address, shard, extra=["--model", str(other)])
    assert client.wait() == EXIT_REFUSED_TO_START
    log = client.log()
    assert "refusing to start" in log and "fingerprint" in log
    assert "Traceback" not in log


def test_sigterm_ends_a_waiting_client_cleanly(idle_server, clients, tmp_path: Path) -> None:
    """The client waits in a 10-minute long poll; SIGTERM cancels it and the client exits 0."""
    shard = client_shards(tmp_path / "data", sizes=(8,))[0]
    client = clients.start("alice", idle_server.address, shard, pipe=True,
                           extra=["--max-wait-s", "600"])  # fmt: skip
    assert client.process.stdout is not None
    for line in client.process.stdout:  # until the client is about to ask for a task
        if "loaded 8 examples" in line:
            break
    else:
        pytest.fail("the client ended before loading its data")
    client.process.send_signal(signal.SIGTERM)
    assert client.wait(timeout=120) == 0
    rest = client.process.stdout.read()
    assert "received SIGTERM" in rest and "Traceback" not in rest
    assert token_of("alice") not in rest
