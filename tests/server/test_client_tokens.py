"""The tokens source is authoritative at every start: a client it no longer names is revoked,
tokens move between names (a swap, a removed client's token given to a new name), two names
with one token are refused with one line naming both, and the published placeholders never
work."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.errors import ConflictError
from fedrot_server.service import start_server
from fedrot_server.settings import ServerSettings, describe_errors, load_settings
from fedrot_server.storage.store import SqliteStore, TokenChanges
from wire import (
    WireClient,
    initializer_of,
    killed,
    make_settings,
    running_server,
    synthetic_adapter,
    token_of,
    upload_once,
)

ALICE, BOB, CAROL = (token_of(n) for n in ("alice", "bob", "carol"))


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(tmp_path / "db.sqlite3")
    store.sync_client_tokens({"alice": ALICE, "bob": BOB})
    return store


def test_a_name_missing_from_the_tokens_is_revoked_and_restored_when_back(
    store: SqliteStore,
) -> None:
    changes = store.sync_client_tokens({"bob": BOB})
    assert changes == TokenChanges(revoked=("alice",))
    assert store.client_for_token(ALICE) == ("alice", True)
    assert store.client_for_token(BOB) == ("bob", False)
    assert store.sync_client_tokens({"bob": BOB}) == TokenChanges()  # nothing new to say
    assert store.sync_client_tokens({"alice": ALICE, "bob": BOB}) == TokenChanges(
        restored=("alice",)
    )
    assert store.client_for_token(ALICE) == ("alice", False)


def test_swapped_tokens_move_with_the_names(store: SqliteStore) -> None:
    changes = store.sync_client_tokens({"alice": BOB, "bob": ALICE})
    assert changes == TokenChanges(rekeyed=("alice", "bob"))
    assert store.client_for_token(BOB) == ("alice", False)
    assert store.client_for_token(ALICE) == ("bob", False)


def test_a_removed_clients_token_can_go_to_a_new_name(store: SqliteStore) -> None:
    changes = store.sync_client_tokens({"carol": ALICE, "bob": BOB})
    assert changes == TokenChanges(added=("carol",), revoked=("alice",))
    assert store.client_for_token(ALICE) == ("carol", False)
    # alice is still known (her runs' history names her) and stays revoked with no token.
    names = {r[0]: r[1] for r in store._db.execute("SELECT name, revoked FROM clients")}
    assert names == {"alice": 1, "bob": 0, "carol": 0}


def test_an_operators_revocation_lasts_until_a_new_token(store: SqliteStore) -> None:
    store.revoke_client("bob")
    assert store.sync_client_tokens({"alice": ALICE, "bob": BOB}) == TokenChanges()
    assert store.client_for_token(BOB) == ("bob", True)
    assert store.sync_client_tokens({"alice": ALICE, "bob": CAROL}) == TokenChanges(
        rekeyed=("bob",), restored=("bob",)
    )
    assert store.client_for_token(CAROL) == ("bob", False)
    assert store.client_for_token(BOB) is None


def test_a_failed_sync_changes_nothing(store: SqliteStore) -> None:
    with pytest.raises(ConflictError):
        store.sync_client_tokens({"alice": BOB, "bob": BOB, "carol": CAROL})
    assert store.client_for_token(ALICE) == ("alice", False)
    assert store.client_for_token(BOB) == ("bob", False)
    assert store.client_for_token(CAROL) is None


def settings_error(tmp_path: Path, **values: object) -> str:
    """The lines fedrot-server prints for these settings."""
    with pytest.raises(ValidationError) as caught:
        ServerSettings(state_dir=tmp_path, **values)
    return describe_errors(caught.value)


def test_two_names_with_one_token_are_refused_naming_both(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"alice={ALICE}\ncarol={CAROL}\n")
    message = settings_error(tmp_path, tokens_file=tokens_file, tokens={"bob": ALICE})
    assert "clients 'alice' and 'bob' have the same token" in message
    assert ALICE not in message


@pytest.mark.parametrize("field", ["tokens", "admin_token", "dashboard_read_token"])
def test_the_published_placeholders_are_refused(tmp_path: Path, field: str) -> None:
    placeholder = "change-me-client-0-0000000000"
    values: dict[str, object] = {"tokens": {"alice": ALICE}}
    values[field] = {"alice": placeholder} if field == "tokens" else placeholder
    message = settings_error(tmp_path, **values)
    assert "published placeholder" in message and placeholder not in message


def test_admin_and_read_tokens_come_from_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin, read = tmp_path / "admin-token", tmp_path / "read-token"
    admin.write_text("an-admin-token-0123456789\n")
    read.write_text("a-read-token-0123456789\n")
    monkeypatch.setenv("FEDROT_SERVER_TOKENS", f'{{"alice": "{ALICE}"}}')
    monkeypatch.setenv("FEDROT_SERVER_ADMIN_TOKEN_FILE", str(admin))
    settings = load_settings(["--dashboard-read-token-file", str(read)])
    assert settings.admin_token == "an-admin-token-0123456789"
    assert settings.dashboard_read_token == "a-read-token-0123456789"
    both = settings_error(tmp_path, tokens={"alice": ALICE}, admin_token_file=admin,
                          admin_token="another-admin-token-0123")  # fmt: skip
    assert "give admin_token or admin_token_file, not both" in both
    admin.write_text("\n")
    assert "empty" in settings_error(tmp_path, tokens={"alice": ALICE}, admin_token_file=admin)


def test_restarts_follow_the_tokens_source(tmp_path: Path) -> None:
    """Over real gRPC: alice removed (also with resume off) is refused and shown revoked; then
    swapped tokens start cleanly and each token acts as its new name."""
    initial = synthetic_adapter()

    async def enrol(server, token: str) -> str:  # noqa: ANN001
        client = WireClient(server.address, token)
        try:
            return (await client.enroll()).client_id
        finally:
            await client.close()

    async def scenario() -> None:
        both = make_settings(tmp_path, ["alice", "bob"], min_clients=2)
        async with running_server(both, initial) as server:
            assert await enrol(server, ALICE) == "alice"
            first_run = server.spec.run_id
        for resume in (True, False):
            only_bob = make_settings(tmp_path, ["bob"], min_clients=1, resume=resume)
            async with running_server(only_bob, initial) as server:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await enrol(server, ALICE)
                assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
                assert "alice" in (refused.value.details() or "")
                assert await enrol(server, BOB) == "bob"
                shown = {c.name: c.revoked for c in server.store.clients(first_run)}
                assert shown["alice"] is True
        swapped = make_settings(tmp_path, ["alice"], min_clients=1,
                                tokens={"alice": BOB, "bob": ALICE})  # fmt: skip
        async with running_server(swapped, initial) as server:
            assert await enrol(server, BOB) == "alice"
            assert await enrol(server, ALICE) == "bob"

    asyncio.run(scenario())
    with sqlite3.connect(tmp_path / "state" / "fedrot.sqlite3") as db:
        assert dict(db.execute("SELECT name, revoked FROM clients")) == {"alice": 0, "bob": 0}


def test_a_participant_removed_from_the_tokens_is_not_waited_for_after_a_restart(
    tmp_path: Path,
) -> None:
    """The open round of a resumed run drops a participant the tokens no longer name: the
    others' reports close it (quorum all), as after an operator's revocation."""
    initializer = initializer_of(synthetic_adapter())
    names = ("alice", "bob", "carol")

    async def scenario() -> None:
        everyone = make_settings(tmp_path, names, rounds=2, quorum="all")
        server = await start_server(everyone, initializer=initializer)
        clients = {n: WireClient(server.address, token_of(n)) for n in names}
        await asyncio.gather(*(c.enroll() for c in clients.values()))
        assert await upload_once(clients["alice"], 1) == pb.UPLOAD_STATUS_ACCEPTED
        for client in clients.values():
            await client.close()
        await killed(server)

        without_carol = make_settings(tmp_path, names[:2], rounds=2, quorum="all", min_clients=2)
        server = await start_server(without_carol, initializer=initializer)
        try:
            run_id = server.spec.run_id
            bob = WireClient(server.address, token_of("bob"), run_id=run_id)
            assert await upload_once(bob, 2) == pb.UPLOAD_STATUS_ACCEPTED
            for _ in range(100):
                if server.store.rounds(run_id)[0].phase.value == "closed":
                    break
                await asyncio.sleep(0.05)
            (round0, *_) = server.store.rounds(run_id)
            assert round0.phase.value == "closed" and sorted(round0.reporters) == ["alice", "bob"]
            assert {c.name: c.revoked for c in server.store.clients(run_id)}["carol"] is True
            await bob.close()
        finally:
            await server.stop(0.1)

    asyncio.run(scenario())
