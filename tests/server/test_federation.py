"""A full federation over real gRPC: 3 clients x 2 rounds; the server's aggregate equals the
core's on the same uploads, and every round leaves a PEFT directory."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path

import pytest

from fedrot.adapters import Adapter
from fedrot.codec import decode_adapter
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.storage.state import RoundPhase, RunPhase
from wire import (
    WireClient,
    adapter_of,
    assert_same,
    core_aggregate,
    encode_update,
    local_update,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    trained_of,
)

CLIENTS = ("alice", "bob", "carol")


async def participate(
    client: WireClient, index: int, sent: dict[tuple[int, str], bytes]
) -> pb.DoneTask:
    """Enrol, then train (fake) and upload every round until DONE."""
    await client.enroll(host=f"test-{index}")
    while True:
        response = await client.get_task()
        kind = response.WhichOneof("task")
        if kind == "done":
            return response.done
        if kind == "wait":
            continue
        task = response.train
        payload = await client.download(task.round)
        assert task.global_adapter.sha256 == decode_sha(payload)
        reference = adapter_of(payload)
        update = encode_update(local_update(reference, trained_of(task), seed=97 * task.round + index))
        beat = await client.heartbeat(task.round)
        assert beat.round_open and beat.current_round == task.round
        result = await client.upload(task.round, update, trained_of(task), sample_count=10 + 5 * index,
                                     metrics={"train_loss": 1.0 + index})  # fmt: skip
        assert result.status == pb.UPLOAD_STATUS_ACCEPTED
        assert result.bytes_received == len(update)
        sent[(task.round, client.token or "")] = update


def decode_sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("strategy", ["fedrot", "fedit", "ffa"])
def test_three_clients_two_rounds(
    tmp_path: Path, strategy: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    initial = synthetic_adapter()
    settings = make_settings(tmp_path, CLIENTS, strategy={"name": strategy})

    async def scenario() -> None:
        sent: dict[tuple[int, str], bytes] = {}
        async with running_server(settings, initial) as server:
            clients = [WireClient(server.address, token_of(name)) for name in CLIENTS]
            dones = await asyncio.wait_for(
                asyncio.gather(*(participate(c, i, sent) for i, c in enumerate(clients))), 60
            )
            assert {d.rounds_completed for d in dones} == {2}
            final = await clients[0].download(2)
            assert decode_sha(final) == dones[0].final_adapter.sha256
            check_rounds(server, strategy, initial, sent, final)
            for client in clients:
                await client.close()

    asyncio.run(scenario())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "round 1 closed" in logged
    assert not any(token_of(name) in logged for name in CLIENTS)


def check_rounds(server, strategy: str, initial: Adapter, sent: dict, final: bytes) -> None:  # noqa: ANN001
    run_id = server.spec.run_id
    store = server.store
    assert store.run(run_id).phase is RunPhase.FINISHED
    run_dir = server.settings.state_dir / "runs" / run_id
    reference = initial
    weights = {token_of(name): (name, 10 + 5 * i) for i, name in enumerate(CLIENTS)}
    for round_index, row in enumerate(store.rounds(run_id)):
        assert row.phase is RoundPhase.CLOSED
        assert sorted(row.reporters) == sorted(CLIENTS)
        uploads = store.uploads(run_id, round_index)
        by_name = {name: sent[(round_index, token)] for token, (name, _) in weights.items()}
        ordered = [(u.client, by_name[u.client], u.sample_count) for u in uploads]
        assert [u.sample_count for u in uploads] == [dict(weights.values())[u.client] for u in uploads]
        expected = core_aggregate(strategy, round_index, reference, ordered)
        weights_file = run_dir / "rounds" / str(round_index) / "adapter" / "adapter_model.safetensors"
        produced = adapter_of(weights_file.read_bytes())
        assert_same(produced, expected)
        metadata = decode_adapter(weights_file.read_bytes()).metadata  # names its folder
        assert (metadata["round"], metadata["starts_round"]) == (str(round_index), str(round_index + 1))
        summary = row.summary
        assert summary["bytes_in"] == sum(len(p) for _, p, _ in ordered)
        assert summary["bytes_out"] >= 3 * len(initial_bytes(reference))
        assert summary["client_metrics"]["train_loss"] == pytest.approx(
            sum((1.0 + i) * (10 + 5 * i) for i in range(3)) / sum(10 + 5 * i for i in range(3))
        )
        reference = produced
    assert weights_file.read_bytes() == final
    initial_file = run_dir / "initial" / "adapter" / "adapter_model.safetensors"
    assert decode_adapter(initial_file.read_bytes()).metadata["round"] == "initial"
    check_peft_directory(weights_file.parent)


def initial_bytes(adapter: Adapter) -> bytes:
    return encode_update(adapter.to_state_dict())


def check_peft_directory(folder: Path) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "SEQ_CLS"
    assert config["r"] == 2 and config["lora_alpha"] == 4.0
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert config["modules_to_save"] == ["classifier"]
    assert config["base_model_name_or_path"] == "tiny-bert"
    tensors = decode_adapter((folder / "adapter_model.safetensors").read_bytes()).tensors
    assert any(key.endswith(".lora_A.weight") for key in tensors)
