"""Clients across runs (a standing server) and label names carried by the run: the daemon and
the SDK against the scripted FederationService (real gRPC on port 0, tiny BERT)."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

import fedrot_client
from fedrot.codec import encode_adapter
from fedrot_client import main as client_main
from fedrot_client.daemon import ClientDaemon
from fedrot_client.errors import RunDeclinedError, UsageError
from fedrot_client.messages import model_spec_of
from fedrot_client.models import ModelSpec
from fedrot_client.run_data import label_difference, run_vocabulary
from fedrot_client.run_info import RunInfo
from fedrot_client.settings import SettingsError
from fedrot_client.state import ClientState, PendingUpload
from fedrot_client.transport import RetryPolicy, Transport, sha256_hex
from fedrot_proto.v1 import federation_pb2 as pb
from federation_fake import CLIENT_ID, RUN_ID, TOKEN, RunningFake
from test_daemon import make_settings, run_daemon

RUN_2 = RUN_ID + "-2"
TEXTS = ["good fine great", "nice good day", "bad awful poor", "sad bad day"] * 4
NAMES = ["pos", "pos", "neg", "neg"] * 4


def write_rows(path: Path, labels: list[object]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                            for t, y in zip(TEXTS, labels)))  # fmt: skip
    return path


@pytest.fixture
def named_data(tmp_path: Path) -> Path:
    """Rows whose labels are names ('pos', 'neg'), not ids."""
    return write_rows(tmp_path / "named.jsonl", NAMES)


@pytest.fixture
def id_data(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "ids.jsonl", [1, 1, 0, 0] * 4)


def labels_file(tmp_path: Path, names: list[str]) -> Path:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(names))
    return path


def accepted_runs(fake: RunningFake) -> list[tuple[str, int]]:
    return [(header.run_id, header.round) for header, _ in fake.servicer.log["accepted"]]


# -- the daemon across runs -------------------------------------------------------------------
def test_the_daemon_follows_two_runs_with_a_folder_per_run(
    start_fake, id_data: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=1, runs=2)
    settings = make_settings(fake.address, id_data, tmp_path / "state",
                             final_adapter_dir=tmp_path / "final")  # fmt: skip
    stop = threading.Event()
    transport = Transport(fake.address, TOKEN, stop=stop, policy=RetryPolicy(0.01, 0.05))
    daemon = ClientDaemon(settings, transport, stop=stop, info={"test": "yes"})
    try:
        last = daemon.run()
    finally:
        transport.close()

    assert accepted_runs(fake) == [(RUN_ID, 0), (RUN_2, 0)]
    assert [(o.run_id, o.reason, o.finished) for o in daemon.outcomes] == [
        (RUN_ID, "done", True), (RUN_2, "done", True)]  # fmt: skip
    assert last is daemon.outcomes[-1]
    assert [o.final_adapter_dir for o in daemon.outcomes] == [
        tmp_path / "final" / RUN_ID, tmp_path / "final" / RUN_2]  # fmt: skip
    assert all((o.final_adapter_dir / "adapter_model.safetensors").exists()
               for o in daemon.outcomes)  # fmt: skip
    state = ClientState(tmp_path / "state")
    assert state.completed_rounds(RUN_ID) == {0} and state.completed_rounds(RUN_2) == {0}
    assert fake.servicer.log["enrolments"] == [("run", RUN_ID), ("run", RUN_2)]


def test_wait_answers_are_waited_out_and_logged_once(
    start_fake, id_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = start_fake(rounds=1, waits=4)
    with caplog.at_level(logging.INFO, logger="fedrot_client.enrolment"):
        outcome = run_daemon(fake, make_settings(fake.address, id_data, tmp_path / "state"))

    assert outcome.finished and outcome.run_id == RUN_ID
    kinds = [kind for kind, _ in fake.servicer.log["enrolments"]]
    assert kinds == ["wait"] * 4 + ["run"]
    waiting = [r for r in caplog.records if "waiting for one" in r.getMessage()]
    assert len(waiting) == 1 and "the next run has not started" in waiting[0].getMessage()


def test_a_finished_run_offered_again_is_waited_out(
    start_fake, id_data: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=1, runs=2, reoffer_finished=2)
    outcome = run_daemon(fake, make_settings(fake.address, id_data, tmp_path / "state"))
    assert outcome.finished and outcome.run_id == RUN_2
    assert accepted_runs(fake) == [(RUN_ID, 0), (RUN_2, 0)]
    assert fake.servicer.log["enrolments"] == [("run", RUN_ID)] * 3 + [("run", RUN_2)]


def test_one_run_leaves_after_the_first_run(start_fake, id_data: Path, tmp_path: Path) -> None:
    fake = start_fake(rounds=1, runs=2, standing=True)
    folder = tmp_path / "final"
    outcome = run_daemon(fake, make_settings(fake.address, id_data, tmp_path / "state",
                                             one_run=True, final_adapter_dir=folder))  # fmt: skip
    assert outcome.finished and outcome.run_id == RUN_ID
    assert accepted_runs(fake) == [(RUN_ID, 0)]
    assert fake.servicer.log["enrolments"] == [("run", RUN_ID)]  # did not enrol again
    assert outcome.final_adapter_dir == folder and (folder / "adapter_config.json").exists()


def test_a_stop_while_waiting_for_the_next_run_ends_the_daemon(
    start_fake, id_data: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=1, runs=1, standing=True, retry_after_s=0.2)
    stop = threading.Event()
    transport = Transport(fake.address, TOKEN, stop=stop, policy=RetryPolicy(0.01, 0.05))
    daemon = ClientDaemon(make_settings(fake.address, id_data, tmp_path / "state"), transport,
                          stop=stop)  # fmt: skip
    thread = threading.Thread(target=daemon.run)
    thread.start()
    assert fake.servicer.waited.wait(60)  # run 1 is over; the server has no next run
    stop.set()
    transport.cancel()
    thread.join(60)
    transport.close()
    assert not thread.is_alive()
    assert [(o.run_id, o.reason) for o in daemon.outcomes] == [(RUN_ID, "done"), ("", "stopped")]
    assert fake.servicer.log["enrolments"][-1] == ("wait", "no run scheduled")


def test_a_restart_in_the_second_run_resends_its_update_and_keeps_run_1_apart(
    start_fake, id_data: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=2, runs=2)
    state_dir = tmp_path / "state"
    first = run_daemon(fake, make_settings(fake.address, id_data, state_dir, one_run=True))
    assert first.run_id == RUN_ID and ClientState(state_dir).completed_rounds(RUN_ID) == {0, 1}
    # A process that joined run 2 and died right after saving its round-0 update:
    state = ClientState(state_dir)
    state.record_enrolment(RUN_2, CLIENT_ID)
    payload = encode_adapter({k: v + 0.5 for k, v in fake.servicer.initial_tensors.items()})
    state.save_pending(PendingUpload(RUN_2, 0, "run-2-round-0", 12, ("A", "B"),
                                     sha256_hex(payload)), payload)  # fmt: skip

    again = run_daemon(fake, make_settings(fake.address, id_data, state_dir))

    assert again.finished and again.run_id == RUN_2
    run2 = [h for h, _ in fake.servicer.log["accepted"] if h.run_id == RUN_2]
    assert [(h.round, h.idempotency_key) for h in run2][0] == (0, "run-2-round-0")
    assert [h.round for h in run2] == [0, 1]
    assert state.completed_rounds(RUN_2) == {0, 1} and state.pending(RUN_2) is None
    assert state.completed_rounds(RUN_ID) == {0, 1}  # run 1's record as it was


# -- label names carried by the run -----------------------------------------------------------
def test_permuted_labels_decline_the_run_and_a_standing_server_offers_the_next(
    start_fake, named_data: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=1, runs=2, run_labels=(("neg", "pos"), ("pos", "neg")))
    labels = labels_file(tmp_path, ["pos", "neg"])
    settings = make_settings(fake.address, named_data, tmp_path / "state", labels=labels)
    stop = threading.Event()
    transport = Transport(fake.address, TOKEN, stop=stop, policy=RetryPolicy(0.01, 0.05))
    daemon = ClientDaemon(settings, transport, stop=stop)
    try:
        daemon.run()
    finally:
        transport.close()

    line = (f"data labels ({labels}) differ from run {RUN_ID}'s at id 0: 'pos' here, 'neg' in "
            "the run (the run has 'pos' at id 1)")  # fmt: skip
    assert fake.servicer.log["declined"] == [(RUN_ID, line)]
    assert [(o.run_id, o.reason, o.declined) for o in daemon.outcomes] == [
        (RUN_ID, "declined", line), (RUN_2, "done", "")]  # fmt: skip
    assert accepted_runs(fake) == [(RUN_2, 0)]


def test_a_single_run_server_ends_the_client_with_the_one_line(
    start_fake, named_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = start_fake(rounds=1, run_labels=(("neg", "pos", "other"),))
    labels = labels_file(tmp_path, ["neg", "pos"])
    settings = make_settings(fake.address, named_data, tmp_path / "state", labels=labels,
                             reconnect_timeout_s=30.0)  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="fedrot_client.main"):
        status = client_main.run(settings)

    line = (f"declined run {RUN_ID}: data labels ({labels}) differ from run {RUN_ID}'s at id 2: "
            "none here, 'other' in the run (2 labels here, 3 in the run)")  # fmt: skip
    assert status == client_main.EXIT_REFUSED_TO_START
    assert [r.getMessage() for r in caplog.records if r.name == "fedrot_client.main"] == [line]
    assert [run for run, _ in fake.servicer.log["declined"]] == [RUN_ID]
    assert fake.servicer.log["upload_headers"] == []


@pytest.mark.parametrize("after_decline", ["refuse", "wait"])
def test_a_single_run_server_that_refuses_or_waits_after_a_decline_ends_the_client(
    start_fake, named_data: Path, tmp_path: Path, after_decline: str
) -> None:
    """A server that refuses the declined client's enrolment ends it at once; one that answers
    ``wait`` ends it when the server goes away (a single-run server's end)."""
    fake = start_fake(rounds=1, run_labels=(("neg", "pos"),), after_decline=after_decline)
    settings = make_settings(fake.address, named_data, tmp_path / "state",
                             labels=labels_file(tmp_path, ["pos", "neg"]))  # fmt: skip
    stop = threading.Event()
    transport = Transport(fake.address, TOKEN, stop=stop,
                          policy=RetryPolicy(0.01, 0.05, give_up_after_s=1.0))  # fmt: skip
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            ClientDaemon(settings, transport, stop=stop).run()
        except RunDeclinedError as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    if after_decline == "wait":
        assert fake.servicer.waited.wait(60)
        fake.stop()  # the run ends without this client, and the server with it
    thread.join(60)
    transport.close()
    assert not thread.is_alive() and len(errors) == 1
    assert str(errors[0]).startswith(f"declined run {RUN_ID}: data labels ")
    assert str(errors[0]).endswith("(then the server went away)") == (after_decline == "wait")


def test_the_runs_names_read_the_datas_string_labels(
    start_fake, named_data: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=1, run_labels=(("neg", "pos"),))
    outcome = run_daemon(fake, make_settings(fake.address, named_data, tmp_path / "state"))
    assert outcome.finished and accepted_runs(fake) == [(RUN_ID, 0)]


def test_a_label_the_run_does_not_name_declines_it_naming_the_value_and_file(
    start_fake, tmp_path: Path
) -> None:
    data = write_rows(tmp_path / "odd.jsonl", ["pos", "neg", "maybe", "neg"] * 4)
    fake = start_fake(rounds=1, run_labels=(("neg", "pos"),))
    with pytest.raises(RunDeclinedError) as raised:
        run_daemon(fake, make_settings(fake.address, data, tmp_path / "state"))
    assert "\n" not in str(raised.value)
    assert f"{data}:3: field 'label': unknown label 'maybe'" in str(raised.value)
    assert fake.servicer.log["declined"][0][1] in str(raised.value)


def test_instruction_data_declines_a_classification_run(start_fake, tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    fake = start_fake(rounds=1, run_labels=(("neg", "pos"),))
    with pytest.raises(RunDeclinedError, match=f"run {RUN_ID} is a classification run, but "
                       ".*chat.jsonl holds causal-LM instruction rows"):  # fmt: skip
        run_daemon(fake, make_settings(fake.address, data, tmp_path / "state"))
    assert len(fake.servicer.log["declined"]) == 1


def test_a_run_without_label_names_keeps_the_num_labels_check(
    start_fake, named_data: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=1)
    labels = labels_file(tmp_path, ["neg", "pos", "other"])
    with pytest.raises(SettingsError, match="expected a list of 2 names"):
        run_daemon(fake, make_settings(fake.address, named_data, tmp_path / "state",
                                       labels=labels))  # fmt: skip
    assert fake.servicer.log["declined"] == []
    labels.write_text(json.dumps(["pos", "neg"]))  # any order: the run names none
    outcome = run_daemon(fake, make_settings(fake.address, named_data, tmp_path / "state2",
                                             labels=labels))  # fmt: skip
    assert outcome.finished and fake.servicer.log["declined"] == []


def test_a_server_without_decline_run_ends_the_client_at_once(
    start_fake, named_data: Path, tmp_path: Path
) -> None:
    fake = start_fake(rounds=1, runs=2, standing=True, decline_unimplemented=True,
                      run_labels=(("neg", "pos"),))  # fmt: skip
    labels = labels_file(tmp_path, ["pos", "neg"])
    with pytest.raises(RunDeclinedError, match="differ from run run-test's at id 0"):
        run_daemon(fake, make_settings(fake.address, named_data, tmp_path / "state",
                                       labels=labels))  # fmt: skip
    assert fake.servicer.log["enrolments"] == [("run", RUN_ID)]


# -- the SDK across runs ----------------------------------------------------------------------
def follow(fake: RunningFake, state: Path, **options: object):
    values = dict(token=TOKEN, state_dir=state, handle_signals=False, max_wait_s=5.0,
                  backoff_initial_s=0.01, backoff_max_s=0.05)  # fmt: skip
    values.update(options)
    return fedrot_client.runs(fake.address, **values)


def train_run(fed: fedrot_client.Federation) -> None:
    model = fed.build_model()
    for task in fed.tasks():
        task.load_into(model)
        task.submit(model, num_samples=3)


def test_runs_gives_one_federation_per_run(start_fake, tmp_path: Path) -> None:
    fake = start_fake(rounds=1, runs=2, waits=2)
    seen = []
    for fed in follow(fake, tmp_path / "state"):
        with fed:
            train_run(fed)
            seen.append((fed.run.run_id, fed.server_continues))
            fed.save_final(tmp_path / "final" / fed.run.run_id)
    assert seen == [(RUN_ID, True), (RUN_2, False)]
    assert accepted_runs(fake) == [(RUN_ID, 0), (RUN_2, 0)]
    assert (tmp_path / "final" / RUN_2 / "adapter_config.json").exists()


def test_a_declined_run_is_skipped_by_runs_and_refused_by_a_single_run_server(
    start_fake, tmp_path: Path
) -> None:
    standing = start_fake(rounds=1, runs=2, run_labels=(("a", "b"), ("neg", "pos")))
    seen = []
    for fed in follow(standing, tmp_path / "standing"):
        with fed:
            seen.append((fed.run.run_id, fed.run.label_names))
            if fed.run.label_names != ("neg", "pos"):
                fed.decline("labels differ at id 0: 'neg' here, 'a' in the run")
                assert list(fed.tasks()) == []
                continue
            train_run(fed)
    assert seen == [(RUN_ID, ("a", "b")), (RUN_2, ("neg", "pos"))]
    assert standing.servicer.log["declined"] == [
        (RUN_ID, "labels differ at id 0: 'neg' here, 'a' in the run")]  # fmt: skip

    single = start_fake(rounds=1, run_labels=(("a", "b"),))
    federations = follow(single, tmp_path / "single")
    with next(federations) as fed:
        fed.decline("not my labels")
    with pytest.raises(RunDeclinedError, match=f"declined run {RUN_ID}: not my labels"):
        with next(federations):
            pass


def test_the_runs_label_names_name_the_models_and_the_final_adapters_classes(
    start_fake, tmp_path: Path
) -> None:
    fake = start_fake(rounds=1, run_labels=(("neg", "pos"),))
    for fed in follow(fake, tmp_path / "state"):
        with fed:
            model = fed.build_model()
            assert model.config.id2label == {0: "neg", 1: "pos"}
            for task in fed.tasks():
                task.load_into(model)
                task.submit(model, num_samples=3)
            folder = fed.save_final(tmp_path / "final")
    config = json.loads((folder / "adapter_config.json").read_text())
    base = json.loads((Path(config["base_model_name_or_path"]) / "config.json").read_text())
    assert base["id2label"] == {"0": "neg", "1": "pos"}


def test_runs_refuses_a_run_left_unfinished(start_fake, tmp_path: Path) -> None:
    fake = start_fake(rounds=1, runs=2)
    federations = follow(fake, tmp_path / "state")
    with next(federations):
        pass
    with pytest.raises(UsageError, match="left before it ended"):
        next(federations)


def test_runs_checks_its_settings_at_once() -> None:
    with pytest.raises(SettingsError, match="server"):
        fedrot_client.runs("no-port", token="t" * 16)


# -- the comparison itself --------------------------------------------------------------------
@pytest.mark.parametrize(("here", "run", "expected"), [
    (["a", "b"], ["a", "b"], None),
    (["b", "a"], ["a", "b"], "at id 0: 'b' here, 'a' in the run (the run has 'b' at id 1)"),
    (["a", "x"], ["a", "b"], "at id 1: 'x' here, 'b' in the run"),
    (["a"], ["a", "b"], "at id 1: none here, 'b' in the run (1 labels here, 2 in the run)"),
    (["a", "b", "c"], ["a", "b"], "at id 2: 'c' here, none in the run (3 labels here, 2 in the run)"),
])  # fmt: skip
def test_label_difference_names_the_first_one(here: list[str], run: list[str],
                                              expected: str | None) -> None:  # fmt: skip
    assert label_difference(here, run) == expected


def test_the_runs_names_number_the_datas_labels(id_data: Path, tmp_path: Path) -> None:
    """With the run's names and no labels file, 'neg' is the id the run gives it."""
    settings = make_settings("127.0.0.1:1", id_data, tmp_path / "state")
    run = run_info(label_names=("pos", "neg"))
    vocabulary = run_vocabulary(settings, run)
    assert [vocabulary.id_of(name) for name in ("pos", "neg", 1)] == [0, 1, 1]
    labelled = make_settings("127.0.0.1:1", id_data, tmp_path / "state",
                             labels=labels_file(tmp_path, ["pos", "neg"]))  # fmt: skip
    assert run_vocabulary(labelled, run).names == ("pos", "neg")


def test_a_runs_label_names_become_the_model_specs() -> None:
    message = pb.ModelSpec(name="tiny-bert", task=pb.MODEL_TASK_CLASSIFICATION, num_labels=2,
                           label_names=["neg", "pos"])  # fmt: skip
    assert model_spec_of(message).label_names == ("neg", "pos")
    message.label_names.append("other")
    with pytest.raises(ValueError, match="names 3 classes, but model.num_labels is 2"):
        model_spec_of(message)


def run_info(**fields: object) -> RunInfo:
    values = dict(run_id=RUN_ID, client_id=CLIENT_ID, rounds=1,
                  model=ModelSpec("tiny-bert", num_labels=2), fingerprint="", lora=None,
                  strategy="fedrot", alignment_strength=0.4, schema=None,
                  heartbeat_interval_s=5.0)  # fmt: skip
    values.update(fields)
    return RunInfo(**values)  # type: ignore[arg-type]
