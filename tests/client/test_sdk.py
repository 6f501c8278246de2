"""The client SDK (fedrot_client.connect) against a scripted FederationService (real gRPC on
port 0, tiny BERT): the contract's names, and every misuse refused before a byte is sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import fedrot_client
from fedrot.adapters import Factor
from fedrot.errors import SchemaError
from fedrot_client.errors import FrozenFactorError, RoundClosedError, UsageError
from fedrot_client.settings import SettingsError
from fedrot_client.state import ClientState
from fedrot_proto.v1 import federation_pb2 as pb
from federation_fake import CLIENT_ID, RUN_ID, TOKEN, RunningFake


def connect(fake: RunningFake, state: Path, **options: object) -> fedrot_client.Federation:
    values = dict(token=TOKEN, state_dir=state, handle_signals=False, max_wait_s=5.0,
                  backoff_initial_s=0.01, backoff_max_s=0.05)  # fmt: skip
    values.update(options)
    return fedrot_client.connect(fake.address, **values)


def nudge(model: PeftModel, amount: float = 0.01) -> None:
    """Move every trainable parameter a little, like one optimiser step."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(amount)


def test_the_contract_names_and_a_full_run(start_fake, tmp_path: Path) -> None:
    fake = start_fake(rounds=2)
    with connect(fake, tmp_path / "state") as fed:
        run = fed.run
        assert (run.run_id, run.client_id, run.rounds, run.task) == (RUN_ID, CLIENT_ID, 2,
                                                                     "classification")
        assert run.model.name == "tiny-bert" and run.fingerprint.startswith("sha256:")
        assert (run.lora.rank, run.lora.alpha, run.lora.target_modules) == (2, 4.0,
                                                                            ("query", "value"))
        model = fed.build_model()
        assert isinstance(model, PeftModel)
        seen = []
        for task in fed.tasks():
            seen.append((task.round_index, task.factors, task.training.local_steps))
            task.load_into(model)
            assert torch.equal(task.state_dict()[next(iter(fake.servicer.global_tensors))],
                               next(iter(fake.servicer.global_tensors.values())))
            nudge(model)
            assert task.progress(1, 1)
            submission = task.submit(model, num_samples=7, metrics={"train_loss": 0.5})
            assert submission.status == "accepted" and not task.is_open
        assert fed.finished
        folder = fed.save_final(tmp_path / "final")
    assert seen == [(0, frozenset({Factor.A, Factor.B}), 3), (1, frozenset({Factor.B}), 3)]
    assert [(r.round_index, r.status) for r in fed.rounds] == [(0, "accepted"), (1, "accepted")]
    (header0, _), (header1, tensors1) = fake.servicer.log["accepted"]
    assert header0.sample_count == 7 and header0.metrics["train_loss"] == 0.5
    assert list(header1.factors) == [pb.FACTOR_B]
    assert not any(k.endswith(".lora_A.weight") for k in tensors1)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["r"] == 2
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], fake.servicer.global_tensors[k]) for k in saved)


def test_a_state_dict_is_submitted_like_the_model(start_fake, tmp_path: Path) -> None:
    fake = start_fake(rounds=1)
    with connect(fake, tmp_path / "state") as fed:
        model = fed.build_model()
        for task in fed.tasks():
            task.load_into(model)
            nudge(model)
            task.submit(get_peft_model_state_dict(model), num_samples=3)
    (_, tensors), = fake.servicer.log["accepted"]
    expected = get_peft_model_state_dict(model)
    assert all(torch.equal(tensors[k], expected[k]) for k in tensors)


def first_task(fed: fedrot_client.Federation):
    return next(iter(fed.tasks()))


@pytest.mark.parametrize(
    ("change", "error", "names"),
    [
        ("drop", SchemaError, "missing key"),
        ("extra", SchemaError, "unexpected key"),
        ("rank", SchemaError, "expected rank 2"),
        ("dtype", SchemaError, "dtype int64"),
        ("nan", SchemaError, "non-finite"),
        ("adapter-names", SchemaError, "get_peft_model_state_dict"),
    ],
)
def test_a_bad_state_dict_is_refused_before_sending(
    start_fake, tmp_path: Path, change: str, error: type, names: str
) -> None:
    fake = start_fake(rounds=1)
    with connect(fake, tmp_path / "state") as fed:
        model = fed.build_model()
        task = first_task(fed)
        task.load_into(model)
        tensors = get_peft_model_state_dict(model)
        key = sorted(k for k in tensors if k.endswith(".lora_B.weight"))[0]
        if change == "drop":
            del tensors[key]
        elif change == "extra":
            tensors["base_model.model.surprise.weight"] = torch.zeros(2)
        elif change == "rank":
            tensors[key] = torch.zeros(tensors[key].shape[0], 3)
        elif change == "dtype":
            tensors[key] = tensors[key].long()
        elif change == "nan":
            tensors[key] = tensors[key].clone().fill_(float("nan"))
        else:
            tensors = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
        with pytest.raises(error, match=names):
            task.submit(tensors, num_samples=3)
        assert task.is_open  # nothing happened: fix it and submit
        task.submit(model, num_samples=3)
    assert len(fake.servicer.log["upload_headers"]) == 1


def test_a_changed_frozen_factor_is_refused_by_key(start_fake, tmp_path: Path) -> None:
    fake = start_fake(rounds=2)
    with connect(fake, tmp_path / "state") as fed:
        model = fed.build_model()
        tasks = fed.tasks()
        task = next(tasks)
        task.load_into(model)
        task.submit(model, num_samples=3)
        task = next(tasks)  # round 1 trains B only: A is frozen
        task.load_into(model)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
        tensors = get_peft_model_state_dict(model)
        a_key = sorted(k for k in tensors if k.endswith(".lora_A.weight"))[0]
        tensors[a_key] = tensors[a_key] + 1e-3
        with pytest.raises(FrozenFactorError, match="factor A is frozen") as raised:
            task.submit(tensors, num_samples=3)
        assert raised.value.key == a_key
        task.withdraw("test")
    assert [h.round for h in fake.servicer.log["upload_headers"]] == [0]


def test_misuse_is_one_line_errors(start_fake, tmp_path: Path) -> None:
    fake = start_fake(rounds=2)
    federation = connect(fake, tmp_path / "state")
    with pytest.raises(UsageError, match="inside the with block"):
        _ = federation.run
    with federation as fed:
        with pytest.raises(UsageError, match="has not finished"):
            fed.save_final(tmp_path / "too-early")
        model = fed.build_model()
        task = first_task(fed)
        task.load_into(model)
        with pytest.raises(UsageError, match="num_samples"):
            task.submit(model, num_samples=0)
        with pytest.raises(UsageError, match="not finite"):
            task.submit(model, num_samples=1, metrics={"train_loss": float("inf")})
        with pytest.raises(UsageError, match="PeftModel or a state dict"):
            task.submit([1, 2], num_samples=1)  # type: ignore[arg-type]
        task.submit(model, num_samples=1)
        with pytest.raises(UsageError, match="already submitted"):
            task.submit(model, num_samples=1)
        with pytest.raises(UsageError, match="already submitted"):
            task.withdraw("late")
    with pytest.raises(UsageError, match="not open"):
        task.submit(model, num_samples=1)
    with pytest.raises(UsageError, match="not open"):
        next(iter(fed.tasks()))
    with pytest.raises(UsageError, match="entered once"):
        federation.__enter__()


def test_bad_connection_settings_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="server"):
        fedrot_client.connect("no-port", token="t" * 24, state_dir=tmp_path)
    with pytest.raises(SettingsError, match="tls_ca_file"):
        fedrot_client.connect("127.0.0.1:1", token="t" * 24, tls_ca_file=tmp_path / "missing")


def test_submitting_after_the_round_closed_is_refused(start_fake, tmp_path: Path) -> None:
    fake = start_fake(rounds=2, close_rounds=frozenset({0}))
    with connect(fake, tmp_path / "state") as fed:
        model = fed.build_model()
        tasks = fed.tasks()
        task = next(tasks)
        assert task.closed and not task.is_open and not task.progress(1, 3)
        with pytest.raises(RoundClosedError, match="round 0 closed"):
            task.submit(model, num_samples=3)
        task.withdraw("closed")
        task = next(tasks)
        task.load_into(model)
        task.submit(model, num_samples=3)
        assert list(tasks) == []
    assert [h.round for h in fake.servicer.log["upload_headers"]] == [1]
    assert [(r.round_index, r.status) for r in fed.rounds] == [(0, "dropped"), (1, "accepted")]


def test_an_exception_in_the_loop_body_withdraws_the_round(start_fake, tmp_path: Path) -> None:
    fake = start_fake(rounds=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        with connect(fake, tmp_path / "state") as fed:
            for _task in fed.tasks():
                raise RuntimeError("CUDA out of memory (pretend)")
    assert (0, pb.CLIENT_PHASE_WITHDRAWN) in fake.servicer.log["heartbeats"]
    assert ClientState(tmp_path / "state").completed_rounds(RUN_ID) == {0}
    assert fake.servicer.log["upload_headers"] == []


def test_a_body_that_moves_on_without_submitting_withdraws(start_fake, tmp_path: Path) -> None:
    fake = start_fake(rounds=2, deadline_polls=3)
    with connect(fake, tmp_path / "state") as fed:
        rounds = [task.round_index for task in fed.tasks()]
    assert rounds == [0, 1]
    withdrawn = [r for r, phase in fake.servicer.log["heartbeats"]
                 if phase == pb.CLIENT_PHASE_WITHDRAWN]  # fmt: skip
    assert set(withdrawn) == {0, 1}
    assert [r.status for r in fed.rounds] == ["dropped", "dropped"]


def test_a_stop_abandons_the_round_without_withdrawing(start_fake, tmp_path: Path) -> None:
    fake = start_fake(rounds=2)
    federation = connect(fake, tmp_path / "state")
    with federation as fed:
        for _task in fed.tasks():
            raise fedrot_client.Stopped("SIGTERM")
    assert federation.stopped
    assert (0, pb.CLIENT_PHASE_WITHDRAWN) not in fake.servicer.log["heartbeats"]
    assert ClientState(tmp_path / "state").completed_rounds(RUN_ID) == frozenset()


def test_a_half_precision_model_passes_the_frozen_factor_check(
    start_fake, tmp_path: Path
) -> None:
    fake = start_fake(rounds=2)
    with connect(fake, tmp_path / "state") as fed:
        model = fed.build_model().to(torch.bfloat16)
        for task in fed.tasks():  # round 1 trains only B: A is frozen, held in bfloat16
            task.load_into(model)
            nudge(model)
            task.submit(model, num_samples=3)
    (_, _), (header1, tensors1) = fake.servicer.log["accepted"]
    assert list(header1.factors) == [pb.FACTOR_B]
    assert all(t.dtype == torch.float32 for t in tensors1.values())


def test_a_failed_upload_keeps_the_update_for_the_next_offer(start_fake, tmp_path: Path) -> None:
    """INTERNAL is not retried: submit raises, the task stays open with its update saved, and
    the round offered again sends that update instead of being trained again."""
    fake = start_fake(rounds=2, internal_first_upload=True)
    trained = []
    with connect(fake, tmp_path / "state") as fed:
        model = fed.build_model()
        for task in fed.tasks():
            task.load_into(model)
            nudge(model)
            trained.append(task.round_index)
            with pytest.raises(fedrot_client.RejectedError, match="INTERNAL"):
                if task.round_index == 0:
                    task.submit(model, num_samples=3)
                raise fedrot_client.RejectedError("test", "INTERNAL", "only round 0 fails")
            if task.round_index == 0:
                assert task.is_open and task.has_saved_update
            else:
                task.submit(model, num_samples=3)
    assert trained == [0, 1]  # round 0 was not handed out (nor trained) again
    headers = fake.servicer.log["upload_headers"]
    assert [h.round for h in headers] == [0, 0, 1] and headers[0].sha256 == headers[1].sha256
    assert (0, pb.CLIENT_PHASE_WITHDRAWN) not in fake.servicer.log["heartbeats"]
    assert [(r.round_index, r.status) for r in fed.rounds] == [(0, "accepted"), (1, "accepted")]


def test_stopped_is_a_quiet_exit() -> None:
    stop = fedrot_client.Stopped("SIGTERM")
    assert isinstance(stop, SystemExit) and stop.code == 0 and str(stop) == "SIGTERM"
    assert not isinstance(stop, Exception)
