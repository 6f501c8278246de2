"""What a resume reads back: the unfinished run, the open round's uploads in arrival order
(late ones included), a damaged or missing spool refused by name, settings differences named,
an older database gaining the new columns, FedEx's running base-weight deltas."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import torch

from fedrot.codec import decode_adapter
from fedrot_server.storage.artifacts import BASE_DELTAS_FILE, RunArtifacts, spool_name
from fedrot_server.errors import SettingsError, StoreError
from fedrot_server.runs.recovery import check_compatible, find_resumable, load_resumption
from fedrot_server.storage.state_lock import StateDirLock
from fedrot_server.storage.state import RunPhase, UploadRow
from fedrot_server.storage.store import SqliteStore
from fedrot_server.rpc.transfers import sha256_hex

PAYLOADS = {"alice": b"alice's update", "bob": b"bob's late update", "carol": b"carol's"}


def row(client: str, round_index: int, sequence: int, merged_into: int | None = None) -> UploadRow:
    payload = PAYLOADS[client]
    return UploadRow(run_id="r1", round_index=round_index, client=client,
                     idempotency_key=f"k-{client}-{round_index}", sample_count=4,
                     size_bytes=len(payload), sha256=sha256_hex(payload), received_at=1.0,
                     sequence=sequence, merged_into=merged_into)  # fmt: skip


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[SqliteStore, RunArtifacts]:
    """Run r1: round 0 closed (bob never reported), round 1 open with alice's update and bob's
    late round-0 update, spooled."""
    store = SqliteStore(tmp_path / "db.sqlite3")
    store.sync_client_tokens({n: f"token-of-{n}-0123456789" for n in PAYLOADS})
    store.create_run("r1", {"lora": {"rank": 4}, "rounds": 3}, at=1.0)
    for name in PAYLOADS:
        store.enroll("r1", name, {}, at=1.0)
    artifacts = RunArtifacts(tmp_path, "r1", {})
    artifacts.save_adapter(None, b"initial")
    store.open_round("r1", 0, ["alice", "bob"], at=1.0, deadline=2.0, target=2)
    artifacts.save_round(0, b"round 0 result", {}, {})
    store.close_round("r1", 0, at=2.0, reporters=["alice"], adapter_sha256=sha256_hex(b"round 0 result"),
                      summary={})  # fmt: skip
    store.open_round("r1", 1, ["alice", "bob", "carol"], at=3.0, deadline=4.0, target=3)
    for upload in (row("alice", 1, 0), row("bob", 0, 1, merged_into=1)):
        artifacts.save_upload(1, upload.client, PAYLOADS[upload.client],
                              trained_round=upload.round_index)  # fmt: skip
        store.record_upload(upload)
    return store, artifacts


def test_the_open_round_is_read_back_in_arrival_order(recorded) -> None:  # noqa: ANN001
    store, artifacts = recorded
    run = store.latest_unfinished_run()
    assert run is not None and run.run_id == "r1" and run.phase is RunPhase.RUNNING
    resumed = load_resumption(store, artifacts, run)
    assert resumed.rounds_completed == 1 and resumed.published == b"round 0 result"
    assert resumed.open_round is not None and resumed.open_round.round_index == 1
    assert resumed.target == 3
    assert [(u.row.client, u.row.round_index, u.payload) for u in resumed.uploads] == [
        ("alice", 1, PAYLOADS["alice"]), ("bob", 0, PAYLOADS["bob"])]  # fmt: skip
    assert sorted(resumed.clients) == sorted(PAYLOADS)
    store.revoke_client("carol")
    assert sorted(load_resumption(store, artifacts, run).clients) == ["alice", "bob"]
    store.set_run_phase("r1", RunPhase.STOPPED, at=5.0)
    assert store.latest_unfinished_run() is None  # a stopped run stays ended


def test_a_crash_before_the_initial_adapter_was_saved_leaves_it_to_encode(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    store.create_run("r0", {"rounds": 1}, at=1.0)
    resumed = load_resumption(store, RunArtifacts(tmp_path, "r0", {}), store.latest_unfinished_run())
    assert (resumed.rounds_completed, resumed.published, resumed.open_round) == (0, None, None)
    store.close()


def test_a_damaged_spool_is_refused_by_name(recorded) -> None:  # noqa: ANN001
    store, artifacts = recorded
    artifacts.spool_path(1, "bob", 0).write_bytes(b"bit rot")
    with pytest.raises(StoreError, match="spooled upload of bob for round 0 is damaged"):
        load_resumption(store, artifacts, store.latest_unfinished_run())
    artifacts.spool_path(1, "bob", 0).unlink()
    with pytest.raises(StoreError, match="spooled upload of bob for round 0 is unreadable"):
        load_resumption(store, artifacts, store.latest_unfinished_run())


def test_every_changed_defining_setting_is_named(recorded) -> None:  # noqa: ANN001
    store, _ = recorded
    run = store.latest_unfinished_run()
    check_compatible(run, {"lora": {"rank": 4}, "rounds": 3, "limits": {"chunk_bytes": 1}})
    with pytest.raises(SettingsError, match=r"lora\.rank was 4, is now 8; rounds was 3, is now 5"):
        check_compatible(run, {"lora": {"rank": 8}, "rounds": 5})


def test_an_older_database_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE rounds (run_id TEXT, round_index INTEGER, phase TEXT, opened_at REAL, "
        "deadline REAL, participants TEXT, closed_at REAL, reporters TEXT DEFAULT '[]', "
        "adapter_sha256 TEXT, summary TEXT DEFAULT '{}', PRIMARY KEY (run_id, round_index));"
        "CREATE TABLE uploads (run_id TEXT, round_index INTEGER, client TEXT, "
        "idempotency_key TEXT, sample_count INTEGER, size_bytes INTEGER, sha256 TEXT, "
        "received_at REAL, sequence INTEGER, metrics TEXT, "
        "PRIMARY KEY (run_id, round_index, client));"
    )
    old.close()
    store = SqliteStore(path)
    columns = {r[1] for r in store._db.execute("PRAGMA table_info(uploads)")}
    assert "merged_into" in columns
    assert "target" in {r[1] for r in store._db.execute("PRAGMA table_info(rounds)")}
    store.close()


def test_fedex_base_deltas_keep_their_running_total_across_a_restart(tmp_path: Path) -> None:
    delta = {"base_model.model.encoder.q": torch.ones(3, 2)}
    before = RunArtifacts(tmp_path, "r1", {}, delta_scale=2.0)
    before.save_round(0, b"r0", {}, delta)
    after = RunArtifacts(tmp_path, "r1", {}, delta_scale=2.0)  # a restarted server
    after.restore_base_deltas(0)
    after.save_round(1, b"r1", {}, delta)
    saved = decode_adapter((after.round_dir(1) / BASE_DELTAS_FILE).read_bytes()).tensors
    torch.testing.assert_close(saved["encoder.q.weight"], torch.full((3, 2), 4.0))


def test_one_server_per_state_folder(tmp_path: Path) -> None:
    held = StateDirLock(tmp_path / "state")
    in_use = rf"in use by another fedrot-server \(pid {os.getpid()}\)"
    with pytest.raises(SettingsError, match=in_use):
        StateDirLock(tmp_path / "state")
    held.release()
    StateDirLock(tmp_path / "state").release()  # free again


def test_late_spool_files_cannot_collide_with_a_dotted_client_name() -> None:
    assert spool_name("alice", 0, 1) != spool_name("alice.round-0", 1, 1)
    assert spool_name("alice", 1, 1) == "alice.safetensors"


def test_starting_afresh_leaves_the_unfinished_run_for_good(recorded) -> None:  # noqa: ANN001
    """resume = false: the unfinished run is marked stopped, so a later plain start cannot take
    it up again behind the new run's back."""
    store, _ = recorded
    assert find_resumable(store, True, None).run_id == "r1"
    assert find_resumable(store, False, None, clock=lambda: 9.0) is None
    assert store.run("r1").phase is RunPhase.STOPPED and store.run("r1").finished_at == 9.0
    assert find_resumable(store, True, None) is None
