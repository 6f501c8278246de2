"""Resuming a run that a crash left unfinished.

Every accepted upload is spooled (fsync, rename, fsync of the folder) and recorded in SQLite (a
synced commit) before it is acknowledged, and every closed round leaves its global adapter on
disk before its row is marked closed. So after a crash the state directory says exactly which
rounds closed, which adapter the next round starts from, and which uploads the open round had
accepted, in their arrival order. A restart with the same ``state_dir`` and ``resume = true``
(the default) finds the most recent run left *waiting* or *running* (a graceful stop marks a run
*stopped*, which stays ended), checks that the settings which define the run are unchanged, and
hands the engine a :class:`Resumption`: the engine re-feeds the spooled uploads into a fresh
aggregator in their original order, so the round's result is the one an uncrashed run computes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedrot.codec import encode_schema
from fedrot_server.storage.artifacts import RunArtifacts
from fedrot_server.errors import SettingsError, StoreError
from fedrot_server.settings import ServerSettings
from fedrot_server.runs.spec import InitialModel, RunSpec
from fedrot_server.storage.state import RoundPhase, RoundRow, RunPhase, RunRow, UploadRow
from fedrot_server.storage.store import SqliteStore
from fedrot_server.rpc.transfers import sha256_hex

logger = logging.getLogger(__name__)

# What defines a run: a restart may resume it only when none of these changed. ``intake`` holds
# the settings that decide how a recorded upload is re-fed (its value limit, its weight when late).
DEFINING_KEYS = ("model", "lora", "strategy", "training", "rounds", "seed", "schema", "fingerprint",
                 "intake")  # fmt: skip


@dataclass(frozen=True)
class SpooledUpload:
    """An accepted upload as recorded, with its spooled payload (checked against its SHA-256)."""

    row: UploadRow
    payload: bytes


@dataclass(frozen=True)
class Resumption:
    """What a resumed run had recorded: ``rounds_completed`` rounds closed; ``published`` is the
    encoded global adapter round ``rounds_completed`` starts from (None: the initial adapter was
    never saved; the engine encodes it again); ``open_round`` (None when no
    round was open) and its ``uploads`` in arrival order; the enrolled ``clients``."""

    run_id: str
    rounds_completed: int
    published: bytes | None
    open_round: RoundRow | None
    target: int | None
    uploads: tuple[SpooledUpload, ...]
    clients: tuple[str, ...]


def run_record(spec: RunSpec, initial: InitialModel, settings: ServerSettings) -> dict[str, Any]:
    """The JSON stored with a run: its spec, the adapter schema, the base-model fingerprint and
    the upload intake settings that a resumed round re-feeds its uploads under."""
    intake = {"max_upload_value": settings.max_upload_value,
              "late_updates": settings.late_updates,
              "staleness_weight": settings.staleness_weight}  # fmt: skip
    return {**spec.to_dict(), "schema": encode_schema(initial.schema),
            "fingerprint": initial.fingerprint, "intake": intake}  # fmt: skip


def find_resumable(
    store: SqliteStore,
    settings_resume: bool,
    run_id: str | None,
    clock: Callable[[], float] = time.time,
) -> RunRow | None:
    """The run to resume: the latest unfinished one (``run_id``'s, when one is asked for).
    With ``resume = false`` every unfinished run is marked stopped: the new run replaces them,
    and no later start takes one of them up again."""
    if not settings_resume:
        for abandoned in store.unfinished_runs():
            logger.warning("run %s is left unfinished for good (resume = false)", abandoned.run_id)
            store.set_run_phase(abandoned.run_id, RunPhase.STOPPED, clock())
        return None
    run = store.latest_unfinished_run()
    if run is None or (run_id is not None and run.run_id != run_id):
        return None
    return run


def check_compatible(run: RunRow, record: Mapping[str, Any]) -> None:
    """SettingsError naming every defining setting that differs from ``run``'s."""
    current = json.loads(json.dumps(dict(record), sort_keys=True))  # as stored: lists, not tuples
    differences: list[str] = []
    for key in DEFINING_KEYS:
        if key in run.spec:  # a run recorded before the key existed is not held to it
            differences += _differences(key, run.spec.get(key), current.get(key))
    if differences:
        raise SettingsError(
            f"the state directory holds unfinished run {run.run_id} with other settings: "
            + "; ".join(differences)
            + ". Restore those settings to resume it, or start a new run with resume = false "
            "(--no-resume)"
        )


def _differences(name: str, stored: object, current: object) -> list[str]:
    if isinstance(stored, Mapping) and isinstance(current, Mapping):
        # Only what the run recorded: a run recorded before a setting existed (e.g. a training
        # field added later) is not held to it, as for the top-level keys.
        keys = sorted(stored)
        return [d for k in keys for d in _differences(f"{name}.{k}", stored.get(k), current.get(k))]
    return [] if stored == current else [f"{name} was {stored!r}, is now {current!r}"]


def load_resumption(store: SqliteStore, artifacts: RunArtifacts, run: RunRow) -> Resumption:
    """Read back what ``run`` recorded; StoreError when a file it needs is missing or damaged."""
    rounds = store.rounds(run.run_id)
    closed = [r for r in rounds if r.phase is RoundPhase.CLOSED]
    completed = max((r.round_index + 1 for r in closed), default=0)
    published: bytes | None
    if completed:
        published = _read(artifacts.read_adapter, completed - 1,
                          what=f"the global adapter of round {completed - 1}")
        expected = next(r.adapter_sha256 for r in closed if r.round_index == completed - 1)
        if sha256_hex(published) != expected:
            raise StoreError(f"run {run.run_id}: the saved adapter of round {completed - 1} "
                             f"does not match its recorded sha256 {expected}")  # fmt: skip
        artifacts.restore_base_deltas(completed - 1)
    else:  # missing when the crash came right after the run was recorded: encoded again
        published = _initial_if_saved(artifacts)
    open_round = next((r for r in rounds if r.round_index == completed
                       and r.phase is RoundPhase.OPEN), None)  # fmt: skip
    uploads = () if open_round is None else tuple(
        _spooled(artifacts, row) for row in store.merged_uploads(run.run_id, completed)
    )  # fmt: skip
    target = None if open_round is None else store.round_target(run.run_id, completed)
    clients = tuple(c.name for c in store.clients(run.run_id)
                    if not c.revoked and c.declined is None)  # fmt: skip
    logger.info("resuming run %s: %s rounds closed, round %s %s with %s accepted uploads",
                run.run_id, completed, completed, "open" if open_round else "not yet open",
                len(uploads))  # fmt: skip
    return Resumption(run.run_id, completed, published, open_round, target, uploads, clients)


def _spooled(artifacts: RunArtifacts, row: UploadRow) -> SpooledUpload:
    what = f"the spooled upload of {row.client} for round {row.round_index}"
    payload = _read(lambda _: artifacts.read_upload(row.merged_round, row.client,
                                                    trained_round=row.round_index),
                    None, what=what)  # fmt: skip
    if len(payload) != row.size_bytes or sha256_hex(payload) != row.sha256:
        raise StoreError(f"{what} is damaged (sha256 differs from the recorded {row.sha256})")
    return SpooledUpload(row, payload)


def _initial_if_saved(artifacts: RunArtifacts) -> bytes | None:
    """The initial adapter's bytes; None when the crash came before it was saved."""
    try:
        return _read(artifacts.read_adapter, None, what="the initial adapter")
    except StoreError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return None
        raise


def _read(reader: Any, argument: object, *, what: str) -> bytes:
    try:
        return reader(argument)
    except OSError as exc:
        raise StoreError(f"cannot resume: {what} is unreadable ({exc})") from exc
