"""The client daemon against a scripted FederationService (real gRPC on port 0, tiny BERT)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedrot.codec import encode_adapter
from fedrot_client.daemon import ClientDaemon, RunOutcome
from fedrot_client.errors import ModelError, RejectedError, StateError
from fedrot_client.settings import ClientSettings
from fedrot_client.state import ClientState, PendingUpload
from fedrot_client.transport import RetryPolicy, Transport, sha256_hex
from fedrot_proto.v1 import federation_pb2 as pb
from federation_fake import CLIENT_ID, RUN_ID, TOKEN, RunningFake

TEXTS = ["good fine great", "nice good day", "bad awful poor", "sad bad day"] * 4
LABELS = [1, 1, 0, 0] * 4


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "shard.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                            for t, y in zip(TEXTS, LABELS)))  # fmt: skip
    return path


def make_settings(address: str, data: Path, state: Path, **overrides: object) -> ClientSettings:
    values = dict(server=address, token=TOKEN, data=data, state_dir=state, progress=False,
                  max_wait_s=5.0, backoff_initial_s=0.01, backoff_max_s=0.05)  # fmt: skip
    values.update(overrides)
    return ClientSettings(**values)


def run_daemon(
    fake: RunningFake, settings: ClientSettings, *, token: str = TOKEN
) -> RunOutcome:
    stop = threading.Event()
    transport = Transport(fake.address, token, stop=stop,
                          policy=RetryPolicy(0.01, 0.05, 2.0, give_up_after_s=30.0))  # fmt: skip
    try:
        return ClientDaemon(settings, transport, stop=stop, info={"test": "yes"}).run()
    finally:
        transport.close()


def test_daemon_trains_every_round_and_uploads_only_the_task_factors(
    start_fake, data_file: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=2)
    before = dict(fake.servicer.global_tensors)
    outcome = run_daemon(fake, make_settings(fake.address, data_file, tmp_path / "state"))

    assert outcome.finished and outcome.run_id == RUN_ID and outcome.client_id == CLIENT_ID
    assert [(r.round_index, r.status) for r in outcome.rounds] == [(0, "accepted"), (1, "accepted")]
    (header0, tensors0), (header1, tensors1) = fake.servicer.log["accepted"]
    assert list(header0.factors) == [pb.FACTOR_A, pb.FACTOR_B]
    assert list(header1.factors) == [pb.FACTOR_B]
    assert not any(key.endswith(".lora_A.weight") for key in tensors1)
    assert any(key.endswith(".lora_B.weight") for key in tensors1)
    assert any("classifier" in key for key in tensors1)  # the head always travels
    assert header0.sample_count == 3 * 4 and header0.metrics["train_loss"] > 0
    # Round 0 trained from the broadcast init: B moved away from zero.
    b_key = next(k for k in tensors0 if k.endswith(".lora_B.weight"))
    assert torch.count_nonzero(before[b_key]) == 0 and torch.count_nonzero(tensors0[b_key]) > 0
    assert ClientState(tmp_path / "state").completed_rounds(RUN_ID) == {0, 1}


def test_each_round_starts_from_the_downloaded_global_adapter(
    start_fake, data_file: Path, tmp_path: Path
) -> None:
    """The fake publishes 50x round 0's B; round 1 must train from that, not its own copy."""
    fake = start_fake(rounds=2, scale_on_accept=50.0)
    run_daemon(fake, make_settings(fake.address, data_file, tmp_path / "state"))
    (_, tensors0), (_, tensors1) = fake.servicer.log["accepted"]
    for key in (k for k in tensors1 if k.endswith(".lora_B.weight")):
        published = 50.0 * tensors0[key]
        assert (tensors1[key] - published).norm() < 0.5 * (tensors1[key] - tensors0[key]).norm()


def test_broken_download_resumes_and_refused_upload_is_resent_with_the_same_key(
    start_fake, data_file: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=1, break_first_download=True, refuse_first_upload=True)
    outcome = run_daemon(fake, make_settings(fake.address, data_file, tmp_path / "state"))

    assert outcome.finished
    offsets = fake.servicer.log["download_offsets"]
    assert offsets[:2] == [0, fake.servicer.script.chunk_bytes]  # resumed after one chunk
    headers = fake.servicer.log["upload_headers"]
    assert len(headers) == 2 and len(fake.servicer.log["accepted"]) == 1
    assert headers[0].idempotency_key == headers[1].idempotency_key
    assert headers[0].sha256 == headers[1].sha256  # the same update, not a second training


def test_restart_resends_the_saved_update_instead_of_training_again(
    start_fake, data_file: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=2)
    state = ClientState(tmp_path / "state")
    state.record_enrolment(RUN_ID, CLIENT_ID)
    update = {k: v + 0.5 for k, v in fake.servicer.global_tensors.items()}
    payload = encode_adapter(update)
    state.save_pending(PendingUpload(RUN_ID, 0, "saved-key-0", 12, ("A", "B"), sha256_hex(payload),
                                     {"train_loss": 0.7}), payload)  # fmt: skip

    outcome = run_daemon(fake, make_settings(fake.address, data_file, tmp_path / "state"))

    first, second = fake.servicer.log["accepted"]
    assert first[0].idempotency_key == "saved-key-0" and first[0].round == 0
    assert second[0].round == 1
    assert [r.round_index for r in outcome.rounds] == [0, 1]
    assert state.pending(RUN_ID) is None


def test_round_closed_by_the_server_is_abandoned(
    start_fake, data_file: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=2, close_rounds=frozenset({0}))
    outcome = run_daemon(fake, make_settings(fake.address, data_file, tmp_path / "state"))

    assert outcome.finished
    assert [(r.round_index, r.status) for r in outcome.rounds] == [(0, "dropped"), (1, "accepted")]
    assert [h.round for h in fake.servicer.log["upload_headers"]] == [1]


def test_mismatched_base_model_refuses_to_start(
    start_fake, data_file: Path, tmp_path: Path
) -> None:
    fake = start_fake(fingerprint="sha256:" + "0" * 64)
    with pytest.raises(ModelError, match="fingerprint"):
        run_daemon(fake, make_settings(fake.address, data_file, tmp_path / "state"))
    assert fake.servicer.log["download_offsets"] == []


def test_unknown_token_is_rejected(start_fake, data_file: Path, tmp_path: Path) -> None:
    fake = start_fake()
    with pytest.raises(RejectedError) as raised:
        run_daemon(fake, make_settings(fake.address, data_file, tmp_path / "state"),
                   token="not-the-token-0123456789")  # fmt: skip
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_stop_abandons_a_long_poll(start_fake, data_file: Path, tmp_path: Path) -> None:
    fake = start_fake(block_polls=True)
    stop = threading.Event()
    transport = Transport(fake.address, TOKEN, stop=stop)
    settings = make_settings(fake.address, data_file, tmp_path / "state", max_wait_s=25.0)
    outcomes: list[RunOutcome] = []
    thread = threading.Thread(
        target=lambda: outcomes.append(ClientDaemon(settings, transport, stop=stop).run())
    )
    thread.start()
    assert fake.servicer.poll_started.wait(60)
    stop.set()
    transport.cancel()
    thread.join(60)
    transport.close()
    assert not thread.is_alive()
    assert outcomes and not outcomes[0].finished and outcomes[0].reason == "stopped"


def test_final_adapter_is_saved_as_a_peft_folder(
    start_fake, data_file: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=1)
    folder = tmp_path / "final"
    outcome = run_daemon(
        fake, make_settings(fake.address, data_file, tmp_path / "state", final_adapter_dir=folder)
    )
    assert outcome.final_adapter_dir == folder
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["modules_to_save"] == ["classifier"]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert saved.keys() == fake.servicer.global_tensors.keys()
    assert all(torch.equal(saved[k], fake.servicer.global_tensors[k]) for k in saved)


def test_a_server_restarted_with_a_new_run_is_joined_again(
    start_fake, data_file: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=2, restart_after_round=0)
    outcome = run_daemon(fake, make_settings(fake.address, data_file, tmp_path / "state"))

    assert outcome.finished and outcome.run_id == RUN_ID + "-restarted"
    runs_and_rounds = [(h.run_id, h.round) for h, _ in fake.servicer.log["accepted"]]
    assert runs_and_rounds == [(RUN_ID, 0), (RUN_ID + "-restarted", 0),
                               (RUN_ID + "-restarted", 1)]  # fmt: skip
    assert ClientState(tmp_path / "state").completed_rounds(RUN_ID + "-restarted") == {0, 1}


def test_an_update_the_server_refuses_is_dropped_not_resent_forever(
    start_fake, data_file: Path, tmp_path: Path
) -> None:
    """INVALID_ARGUMENT (e.g. a value above the server's limit): sending the same update again
    cannot help, so it is dropped, the round is not trained again, and the next one is served;
    a restart does not send it either."""
    fake = start_fake(rounds=2, refuse_rounds=frozenset({0}), deadline_polls=3)
    settings = make_settings(fake.address, data_file, tmp_path / "state")
    outcome = run_daemon(fake, settings)

    assert outcome.finished
    assert [(r.round_index, r.status) for r in outcome.rounds] == [(0, "dropped"), (1, "accepted")]
    assert [h.round for h in fake.servicer.log["upload_headers"]] == [0, 1]  # round 0 sent once
    state = ClientState(tmp_path / "state")
    assert state.pending(RUN_ID) is None and state.completed_rounds(RUN_ID) == {0, 1}
    assert (0, pb.CLIENT_PHASE_WITHDRAWN) in fake.servicer.log["heartbeats"]  # not waited for


def test_diverging_local_training_drops_the_round(
    start_fake, data_file: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=1, learning_rate=1e12, deadline_polls=3)
    outcome = run_daemon(fake, make_settings(fake.address, data_file, tmp_path / "state"))

    assert outcome.finished
    assert [(r.round_index, r.status) for r in outcome.rounds] == [(0, "dropped")]
    assert fake.servicer.log["upload_headers"] == []
    assert ClientState(tmp_path / "state").completed_rounds(RUN_ID) == {0}
    assert (0, pb.CLIENT_PHASE_WITHDRAWN) in fake.servicer.log["heartbeats"]


def test_a_state_folder_of_another_client_is_refused(
    start_fake, data_file: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=1)
    ClientState(tmp_path / "state").record_enrolment(RUN_ID, "client-b")
    with pytest.raises(StateError, match="belongs to client 'client-b'"):
        run_daemon(fake, make_settings(fake.address, data_file, tmp_path / "state"))
    assert fake.servicer.log["upload_headers"] == []
