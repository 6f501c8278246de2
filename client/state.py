"""The client's small state folder: who it is, and per run the rounds it finished and an unsent
upload.

``client.json`` holds the client id the server gave (a folder belongs to one client). Each run
the client joined has its own folder, ``runs/<run id>/``: ``state.json`` lists the rounds
whose update the server accepted (or that were given up), so a restarted client never trains
those again; ``pending.json`` plus ``pending.safetensors`` hold a trained update until the
server has accepted it, so a client restarted mid-upload re-sends it (same idempotency key)
instead of training again. A client that follows a standing server from run to run keeps
every run's record apart: a restart in the second run reads only that run's folder. Every
write goes to a temporary file first and is renamed into place. A folder written by an older
client (``state.json`` and ``pending.*`` at the top) is moved into this layout on enrolment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedrot_client.errors import StateError
from fedrot_client.transport import sha256_hex

logger = logging.getLogger(__name__)

CLIENT_FILE = "client.json"
RUNS_FOLDER = "runs"
STATE_FILE = "state.json"
PENDING_FILE = "pending.json"
PENDING_PAYLOAD_FILE = "pending.safetensors"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def run_folder_name(run_id: str) -> str:
    """A folder name for ``run_id``: the id itself when it is a plain name (letters, digits,
    ``.``, ``_``, ``-``), else ``run-`` and 16 hex digits of its SHA-256."""
    if SAFE_NAME.fullmatch(run_id) and run_id not in (".", ".."):
        return run_id
    return "run-" + hashlib.sha256(run_id.encode()).hexdigest()[:16]


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

    def run_folder(self, run_id: str) -> Path:
        """Where the records of ``run_id`` live."""
        return self.directory / RUNS_FOLDER / run_folder_name(run_id)

    def client_id(self, run_id: str) -> str | None:
        """The client id recorded when ``run_id`` was joined here, or None."""
        return self._run_record(run_id).get("client_id")

    def completed_rounds(self, run_id: str) -> frozenset[int]:
        return frozenset(self._run_record(run_id).get("completed_rounds", []))

    def record_enrolment(self, run_id: str, client_id: str) -> None:
        """Remember our id and the run joined (its rounds done so far are kept: a restart).
        StateError when the folder is another client's (each client needs its own)."""
        self._move_legacy_files()
        owner = self._read(self.directory / CLIENT_FILE).get("client_id")
        if isinstance(owner, str) and owner != client_id:
            raise StateError(
                f"state folder {self.directory} belongs to client {owner!r}, but this token "
                f"enrols as {client_id!r}: give each client its own --state-dir"
            )
        if owner is None:
            self._write(self.directory / CLIENT_FILE, {"client_id": client_id})
        record = self._run_record(run_id)
        record.update(run_id=run_id, client_id=client_id)
        record.setdefault("completed_rounds", [])
        self._write(self.run_folder(run_id) / STATE_FILE, record)

    def record_completed(self, run_id: str, round_index: int) -> None:
        record = self._run_record(run_id)
        if not record:
            raise ValueError(f"no state for run {run_id!r}: record its enrolment first")
        rounds = sorted({*record.get("completed_rounds", []), round_index})
        self._write(self.run_folder(run_id) / STATE_FILE, {**record, "completed_rounds": rounds})

    def save_pending(self, upload: PendingUpload, payload: bytes) -> None:
        if sha256_hex(payload) != upload.sha256:
            raise ValueError("pending upload: sha256 does not match its payload")
        folder = self.run_folder(upload.run_id)
        self._write_bytes(folder / PENDING_PAYLOAD_FILE, payload)
        self._write(folder / PENDING_FILE, {**asdict(upload), "metrics": dict(upload.metrics)})

    def pending(self, run_id: str) -> tuple[PendingUpload, bytes] | None:
        """The unsent upload of ``run_id``, or None (also when its payload is damaged)."""
        folder = self.run_folder(run_id)
        record = self._read(folder / PENDING_FILE)
        if record.get("run_id") != run_id:
            return None
        try:
            upload = PendingUpload(**{**record, "factors": tuple(record["factors"])})
            payload = (folder / PENDING_PAYLOAD_FILE).read_bytes()
        except (OSError, TypeError, KeyError) as exc:
            logger.warning("ignoring unreadable pending upload in %s: %s", folder, exc)
            return None
        if sha256_hex(payload) != upload.sha256:
            logger.warning("ignoring pending upload in %s: payload damaged", folder)
            return None
        return upload, payload

    def clear_pending(self, run_id: str) -> None:
        folder = self.run_folder(run_id)
        for name in (PENDING_FILE, PENDING_PAYLOAD_FILE):
            try:
                (folder / name).unlink(missing_ok=True)
            except OSError as exc:
                raise StateError(f"state folder {folder}: cannot remove {name}: "
                                 f"{exc.strerror or exc}") from exc

    def _run_record(self, run_id: str) -> dict:
        """``runs/<run>/state.json``, or an empty record (with a warning) when its fields have
        the wrong types or it names another run. Forgetting finished rounds counts nothing
        twice: a round trained again uploads under the same idempotency key, which the server
        answers as a duplicate (the same bytes) or refuses (other bytes; the round is then
        dropped here)."""
        path = self.run_folder(run_id) / STATE_FILE
        record = self._read(path)
        if not record:
            return {}
        rounds = record.get("completed_rounds", [])
        fine = (
            all(isinstance(record.get(k), str | None) for k in ("run_id", "client_id"))
            and isinstance(rounds, list)
            and all(isinstance(r, int) and not isinstance(r, bool) for r in rounds)
        )
        if not fine:
            logger.warning("ignoring %s: unexpected field types", path)
            return {}
        return record if record.get("run_id") == run_id else {}

    def _move_legacy_files(self) -> None:
        """An older client's layout (one run's files at the top) into ``runs/<run id>/``."""
        legacy = self._read(self.directory / STATE_FILE)
        run_id, owner = legacy.get("run_id"), legacy.get("client_id")
        if not isinstance(run_id, str) or not run_id:
            return
        folder = self.run_folder(run_id)
        if isinstance(owner, str) and not (self.directory / CLIENT_FILE).exists():
            self._write(self.directory / CLIENT_FILE, {"client_id": owner})
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name in (PENDING_PAYLOAD_FILE, PENDING_FILE, STATE_FILE):
                if (self.directory / name).exists():
                    os.replace(self.directory / name, folder / name)
        except OSError as exc:
            raise StateError(f"state folder {self.directory}: cannot move the files of run "
                             f"{run_id} into {folder}: {exc.strerror or exc}") from exc
        logger.info("state folder %s: moved run %s's records into %s", self.directory, run_id,
                    folder)  # fmt: skip

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable %s: %s", path, exc)
            return {}
        return record if isinstance(record, dict) else {}

    def _write(self, path: Path, record: Mapping[str, object]) -> None:
        self._write_bytes(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())

    def _write_bytes(self, target: Path, data: bytes) -> None:
        temporary = target.with_name(f".{target.name}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with temporary.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except OSError as exc:
            raise StateError(f"state folder {self.directory}: cannot write "
                             f"{target.relative_to(self.directory)}: {exc.strerror or exc}"
                             ) from exc  # fmt: skip
