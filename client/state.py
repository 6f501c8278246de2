"""The client's small state folder: who it is, which rounds it finished, an unsent upload.

``state.json`` holds the run, the client id the server gave, and the rounds whose update the
server accepted; a restarted daemon never trains those again. ``pending.json`` plus
``pending.safetensors`` hold a trained update until the server has accepted it, so a daemon
restarted mid-upload re-sends it (same idempotency key) instead of training again. Every write
goes to a temporary file first and is renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedrot_client.errors import StateError
from fedrot_client.transport import sha256_hex

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
PENDING_FILE = "pending.json"
PENDING_PAYLOAD_FILE = "pending.safetensors"


@dataclass(frozen=True)
class PendingUpload:
    """A trained update not yet accepted; ``sha256`` is its payload's digest (hex)."""

    run_id: str
    round_index: int
    idempotency_key: str
    sample_count: int
    factors: tuple[str, ...]
    sha256: str
    metrics: Mapping[str, float] = field(default_factory=dict)


class ClientState:
    """The state folder of one client (created on first write)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def client_id(self, run_id: str) -> str | None:
        record = self._state()
        return record.get("client_id") if record.get("run_id") == run_id else None

    def completed_rounds(self, run_id: str) -> frozenset[int]:
        record = self._state()
        if record.get("run_id") != run_id:
            return frozenset()
        return frozenset(record.get("completed_rounds", []))

    def record_enrolment(self, run_id: str, client_id: str) -> None:
        """Remember the run and our id; a new run forgets the old run's rounds and upload.
        StateError when the folder is another client's (each client needs its own)."""
        record = self._state()
        owner = record.get("client_id")
        if owner is not None and owner != client_id:
            raise StateError(
                f"state folder {self.directory} belongs to client {owner!r}, but this token "
                f"enrols as {client_id!r}: give each client its own --state-dir"
            )
        if record.get("run_id") != run_id:
            record = {"completed_rounds": []}
            self.clear_pending()
        record.update(run_id=run_id, client_id=client_id)
        self._write(STATE_FILE, record)

    def record_completed(self, run_id: str, round_index: int) -> None:
        record = self._state()
        if record.get("run_id") != run_id:
            raise ValueError(f"state is for run {record.get('run_id')!r}, not {run_id!r}")
        rounds = sorted({*record.get("completed_rounds", []), round_index})
        self._write(STATE_FILE, {**record, "completed_rounds": rounds})

    def save_pending(self, upload: PendingUpload, payload: bytes) -> None:
        if sha256_hex(payload) != upload.sha256:
            raise ValueError("pending upload: sha256 does not match its payload")
        self._write_bytes(PENDING_PAYLOAD_FILE, payload)
        self._write(PENDING_FILE, {**asdict(upload), "metrics": dict(upload.metrics)})

    def pending(self, run_id: str) -> tuple[PendingUpload, bytes] | None:
        """The unsent upload of ``run_id``, or None (also when its payload is damaged)."""
        record = self._read(PENDING_FILE)
        if record.get("run_id") != run_id:
            return None
        try:
            upload = PendingUpload(**{**record, "factors": tuple(record["factors"])})
            payload = (self.directory / PENDING_PAYLOAD_FILE).read_bytes()
        except (OSError, TypeError, KeyError) as exc:
            logger.warning("ignoring unreadable pending upload in %s: %s", self.directory, exc)
            return None
        if sha256_hex(payload) != upload.sha256:
            logger.warning("ignoring pending upload in %s: payload damaged", self.directory)
            return None
        return upload, payload

    def clear_pending(self) -> None:
        for name in (PENDING_FILE, PENDING_PAYLOAD_FILE):
            try:
                (self.directory / name).unlink(missing_ok=True)
            except OSError as exc:
                raise StateError(f"state folder {self.directory}: cannot remove {name}: "
                                 f"{exc.strerror or exc}") from exc

    def _state(self) -> dict:
        """``state.json``, or an empty record (with a warning) when its fields have the wrong
        types. Forgetting finished rounds counts nothing twice: a round trained again uploads
        under the same idempotency key, which the server answers as a duplicate (the same
        bytes) or refuses (other bytes; the round is then dropped here)."""
        record = self._read(STATE_FILE)
        rounds = record.get("completed_rounds", [])
        fine = (
            all(isinstance(record.get(k), str | None) for k in ("run_id", "client_id"))
            and isinstance(rounds, list)
            and all(isinstance(r, int) and not isinstance(r, bool) for r in rounds)
        )
        if not fine:
            logger.warning("ignoring %s: unexpected field types", self.directory / STATE_FILE)
            return {}
        return record

    def _read(self, name: str) -> dict:
        path = self.directory / name
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable %s: %s", path, exc)
            return {}
        return record if isinstance(record, dict) else {}

    def _write(self, name: str, record: Mapping[str, object]) -> None:
        self._write_bytes(name, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())

    def _write_bytes(self, name: str, data: bytes) -> None:
        target = self.directory / name
        temporary = target.with_name(f".{name}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with temporary.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except OSError as exc:
            raise StateError(f"state folder {self.directory}: cannot write {name}: "
                             f"{exc.strerror or exc}") from exc
