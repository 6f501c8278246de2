"""The client's state folder: damaged files are ignored with a warning, a folder that cannot be
written or that belongs to another client is a StateError."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedrot_client.errors import StateError
from fedrot_client.state import ClientState


@pytest.mark.parametrize("record", [
    {"run_id": "r", "client_id": "a", "completed_rounds": "0,1"},
    {"run_id": "r", "client_id": "a", "completed_rounds": [0, "1"]},
    {"run_id": 7, "client_id": "a", "completed_rounds": [0]},
    ["not", "an", "object"],
])  # fmt: skip
def test_a_state_file_with_wrong_types_is_ignored_with_a_warning(
    tmp_path: Path, record: object, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "state.json").write_text(json.dumps(record))
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
