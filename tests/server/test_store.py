"""SQLite state: hashed tokens, runs, rounds, uploads, metrics; a read-only reader."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fedrot_server.errors import ConflictError, NotFoundError, StoreError
from fedrot_server.storage.state import RoundPhase, RunPhase, UploadRow
from fedrot_server.storage.store import SqliteStore, hash_token, open_reader


def upload(client: str, sequence: int, key: str = "k") -> UploadRow:
    return UploadRow(run_id="r1", round_index=0, client=client, idempotency_key=key,
                     sample_count=5 + sequence, size_bytes=100, sha256="0" * 64,
                     received_at=10.0 + sequence, sequence=sequence,
                     metrics={"train_loss": 0.5})  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(tmp_path / "state" / "db.sqlite3")
    store.sync_client_tokens({"alice": "token-a" * 3, "bob": "token-b" * 3})
    store.create_run("r1", {"rounds": 2}, at=1.0)
    for name in ("alice", "bob"):
        store.enroll("r1", name, {"host": name}, at=2.0)
    return store


def test_tokens_are_hashed_and_revocable(store: SqliteStore, tmp_path: Path) -> None:
    assert store.client_for_token("token-a" * 3) == ("alice", False)
    assert store.client_for_token("nope") is None
    store.revoke_client("bob")
    assert store.client_for_token("token-b" * 3) == ("bob", True)
    with pytest.raises(NotFoundError, match="carol"):
        store.revoke_client("carol")
    store.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir())
    assert b"token-a" not in raw and hash_token("token-a" * 3).encode() in raw


def test_round_lifecycle_and_uploads(store: SqliteStore) -> None:
    store.open_round("r1", 0, ["bob", "alice"], at=3.0, deadline=63.0)
    store.extend_round("r1", 0, ["alice", "bob", "carol"], deadline=123.0)
    store.record_upload(upload("bob", 0, "kb"))
    store.record_upload(upload("alice", 1, "ka"))
    with pytest.raises(ConflictError):
        store.record_upload(upload("alice", 2, "ka2"))  # one upload per client and round
    assert [u.client for u in store.uploads("r1", 0)] == ["bob", "alice"]
    assert store.find_upload("r1", "alice", "ka") == upload("alice", 1, "ka")
    assert store.find_upload("r1", "alice", "kb") is None
    store.close_round("r1", 0, at=9.0, reporters=["bob", "alice"], adapter_sha256="f" * 64,
                      summary={"aggregation_error": float("nan"), "bytes_in": 200})  # fmt: skip
    (row,) = store.rounds("r1")
    assert row.phase is RoundPhase.CLOSED and row.participants == ("alice", "bob", "carol")
    assert row.reporters == ("alice", "bob") and row.deadline == 123.0
    assert row.summary == {"aggregation_error": None, "bytes_in": 200}
    assert store.run("r1").rounds_completed == 1 and store.run("r1").phase is RunPhase.RUNNING
    metrics = store.metrics("r1")
    assert {(m.source, m.name, m.value) for m in metrics} == {
        ("alice", "train_loss", 0.5), ("bob", "train_loss", 0.5),
    }  # fmt: skip


def test_reader_sees_writes_and_cannot_write(store: SqliteStore, tmp_path: Path) -> None:
    reader = open_reader(tmp_path / "state" / "db.sqlite3")
    store.touch("r1", "alice", at=7.0)
    store.set_run_phase("r1", RunPhase.FINISHED, at=8.0)
    assert [c.name for c in reader.clients("r1")] == ["alice", "bob"]
    assert reader.clients("r1")[0].last_seen == 7.0
    assert reader.run("r1").phase is RunPhase.FINISHED and reader.run("r1").finished_at == 8.0
    assert [r.run_id for r in reader.runs()] == ["r1"]
    with pytest.raises(sqlite3.OperationalError):
        reader._db.execute("DELETE FROM runs")
    reader.close()
    with pytest.raises(StoreError):
        open_reader(tmp_path / "missing.sqlite3")


def test_non_finite_metrics_are_left_out(store: SqliteStore) -> None:
    store.record_metrics("r1", 0, "server", {"eval_loss": float("nan"), "eval_accuracy": 0.25,
                                             "perplexity": float("inf")})  # fmt: skip
    assert [(m.name, m.value) for m in store.metrics("r1")] == [("eval_accuracy", 0.25)]


@pytest.mark.parametrize("content", [b"", b"this is not a database" * 100])
def test_an_unreadable_database_is_a_store_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.sqlite3"
    path.write_bytes(content)
    reader = open_reader(path)  # an empty file reads as a database without tables
    with pytest.raises(StoreError, match="state read failed"):
        reader.runs()
    reader.close()
