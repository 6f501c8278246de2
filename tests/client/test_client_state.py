"""The client's state folder: damaged files are ignored with a warning, a folder that cannot be
written or that belongs to another client is a StateError, each run's records are kept apart,
and an older client's folder is moved into the per-run layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedrot_client.errors import StateError
from fedrot_client.state import ClientState, PendingUpload, run_folder_name
from fedrot_client.transport import sha256_hex


@pytest.mark.parametrize("record", [
    {"run_id": "r", "client_id": "a", "completed_rounds": "0,1"},
    {"run_id": "r", "client_id": "a", "completed_rounds": [0, "1"]},
    {"run_id": 7, "client_id": "a", "completed_rounds": [0]},
    ["not", "an", "object"],
])  # fmt: skip
def test_a_state_file_with_wrong_types_is_ignored_with_a_warning(
    tmp_path: Path, record: object, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "state.json").write_text(json.dumps(record))
    state = ClientState(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert state.completed_rounds("r") == frozenset()
        assert state.client_id("r") is None
    if isinstance(record, dict):
        assert "unexpected field types" in caplog.text
    state.record_enrolment("r", "a")  # and the folder is usable again
    state.record_completed("r", 2)
    assert state.completed_rounds("r") == {2}


def test_a_folder_that_cannot_be_written_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state folder should be")
    with pytest.raises(StateError, match="state folder .*not-a-folder: cannot"):
        ClientState(blocker).record_enrolment("r", "a")


def test_a_folder_of_another_client_is_refused(tmp_path: Path) -> None:
    state = ClientState(tmp_path)
    state.record_enrolment("r", "alice")
    state.record_completed("r", 0)
    with pytest.raises(StateError, match="belongs to client 'alice'.*enrols as 'bob'"):
        state.record_enrolment("r2", "bob")
    assert state.completed_rounds("r") == {0}  # alice's state is left as it was


def pending_of(run_id: str, round_index: int, payload: bytes) -> PendingUpload:
    return PendingUpload(run_id, round_index, f"key-{run_id}-{round_index}", 3, ("A", "B"),
                         sha256_hex(payload))  # fmt: skip


def test_each_run_keeps_its_own_rounds_and_saved_update(tmp_path: Path) -> None:
    """A client following a standing server: joining run 2 leaves run 1's records alone, and a
    restart in run 2 (a new ClientState on the folder) reads run 2's, not run 1's."""
    state = ClientState(tmp_path)
    state.record_enrolment("run-1", "alice")
    state.record_completed("run-1", 0)
    state.save_pending(pending_of("run-1", 1, b"one"), b"one")
    state.record_enrolment("run-2", "alice")
    state.record_completed("run-2", 0)
    state.save_pending(pending_of("run-2", 1, b"two"), b"two")

    restarted = ClientState(tmp_path)
    restarted.record_enrolment("run-2", "alice")  # a restart keeps what run 2 did
    assert restarted.completed_rounds("run-2") == {0}
    assert restarted.pending("run-2")[1] == b"two"
    assert restarted.completed_rounds("run-1") == {0}
    assert restarted.pending("run-1")[1] == b"one"
    restarted.clear_pending("run-2")
    assert restarted.pending("run-2") is None and restarted.pending("run-1") is not None
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run-1", "run-2"]


def test_an_older_clients_folder_is_moved_into_the_run_layout(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps(
        {"run_id": "old-run", "client_id": "alice", "completed_rounds": [0, 1]}))  # fmt: skip
    upload = pending_of("old-run", 2, b"saved")
    (tmp_path / "pending.safetensors").write_bytes(b"saved")
    (tmp_path / "pending.json").write_text(json.dumps(
        {**upload.__dict__, "factors": list(upload.factors), "metrics": {}}))  # fmt: skip
    state = ClientState(tmp_path)
    state.record_enrolment("old-run", "alice")
    assert state.completed_rounds("old-run") == {0, 1}
    assert state.pending("old-run") == (upload, b"saved")
    assert not (tmp_path / "state.json").exists() and not (tmp_path / "pending.json").exists()
    with pytest.raises(StateError, match="belongs to client 'alice'"):
        state.record_enrolment("old-run", "bob")


@pytest.mark.parametrize(("run_id", "plain"), [("run-7", True), ("2026.12.05_a", True),
                                               ("../up", False), ("a/b", False), ("..", False)])
def test_a_run_folder_is_the_run_id_only_when_it_is_a_plain_name(run_id: str, plain: bool,
                                                                  tmp_path: Path) -> None:
    name = run_folder_name(run_id)
    assert (name == run_id) == plain
    assert "/" not in name and name not in (".", "..")
    assert ClientState(tmp_path).run_folder(run_id).parent == tmp_path / "runs"
