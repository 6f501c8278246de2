"""A snapshot of everything a refused request must leave alone, and a server on its own thread.

:func:`snapshot` reads the SQLite database (every table, every row; only ``last_seen``, a
liveness time, and the operator's telemetry tables are left out), the files under the state
folder, the open round and the aggregation worker's running state (tensors compared bit for
bit). ``before.differences(after)`` lists what changed. Importable as ``server_state`` from
the tests in this folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from fedrot.adapters import Adapter
from fedrot_server.service import FederationServer, start_server
from fedrot_server.settings import ServerSettings
from wire import initializer_of

T = TypeVar("T")
LIVENESS_COLUMNS = frozenset({"last_seen"})
# The operator's telemetry (fedrot_server.storage.telemetry): refusals and interruptions go there.
TELEMETRY_TABLES = frozenset({"refusals", "interruptions", "downloads"})
MAX_DEPTH = 8


@dataclass(frozen=True)
class Snapshot:
    database: dict[str, list[tuple[Any, ...]]]
    files: dict[str, str]
    round: tuple[Any, ...]
    aggregator: dict[str, Any]

    def differences(self, other: Snapshot) -> list[str]:
        """What changed from ``self`` to ``other`` (empty when nothing did)."""
        out = [f"table {t}" for t in sorted(self.database.keys() | other.database.keys())
               if self.database.get(t) != other.database.get(t)]  # fmt: skip
        if self.files != other.files:
            out.append(f"files {sorted(set(self.files.items()) ^ set(other.files.items()))}")
        if self.round != other.round:
            out.append(f"round {self.round} -> {other.round}")
        paths = sorted(self.aggregator.keys() | other.aggregator.keys())
        out += [f"aggregator {path}" for path in paths
                if not _same(self.aggregator.get(path), other.aggregator.get(path))]  # fmt: skip
        return out


def _same(a: Any, b: Any) -> bool:
    """Equal values; tensors bit for bit (an uninitialised buffer may hold NaN patterns)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(torch.equal(_bits(a), _bits(b)))
    return type(a) is type(b) and a == b


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat if t.dtype is torch.bool else flat.view(torch.uint8)


def database_rows(server: FederationServer) -> dict[str, list[tuple[Any, ...]]]:
    uri = f"file:{server.settings.database_path}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        out = {}
        for table in sorted(set(tables) - TELEMETRY_TABLES):
            cursor = db.execute(f"SELECT * FROM {table}")  # noqa: S608 - names from sqlite_master
            keep = [i for i, d in enumerate(cursor.description) if d[0] not in LIVENESS_COLUMNS]
            out[table] = sorted((tuple(row[i] for i in keep) for row in cursor), key=repr)
        return out
    finally:
        db.close()


def state_files(server: FederationServer) -> dict[str, str]:
    """``relative path -> sha256`` of the files under the state folder, the database and the
    drafts of held partial uploads aside (bytes kept for a resume, by design: any other draft
    is listed, so a refused upload that leaves its draft behind shows)."""
    root = server.settings.state_dir
    database = server.settings.database_path.name
    held = held_drafts(server)
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.name.startswith(database) and path not in held
    }


def held_drafts(server: FederationServer) -> set[Any]:
    """The draft files of the partial uploads the open round holds for a resume."""
    rnd = server.engine._round  # noqa: SLF001 - the test looks inside on purpose
    if rnd is None:
        return set()
    return {held.receiver.sink.path for held in rnd.partials._held.values()}  # noqa: SLF001


def open_round(server: FederationServer) -> tuple[Any, ...]:
    rnd = server.engine._round  # noqa: SLF001 - the test looks inside on purpose
    if rnd is None:
        return ()
    return (rnd.index, sorted(rnd.participants), sorted(rnd.reported), sorted(rnd.uploading),
            rnd.closed, rnd.extensions, rnd.deadline)  # fmt: skip


def object_leaves(root: Any) -> dict[str, Any]:
    """``path -> value`` for every tensor (cloned) and scalar reachable from ``root``."""
    out: dict[str, Any] = {}
    seen: set[int] = set()

    def walk(value: Any, path: str, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            out[path] = value.detach().to("cpu").clone()
        elif value is None or isinstance(value, bool | int | float | str):
            out[path] = value
        elif depth < MAX_DEPTH and id(value) not in seen:
            seen.add(id(value))
            for key, item in _children(value):
                walk(item, f"{path}.{key}", depth + 1)

    walk(root, "", 0)
    return out


def _children(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [(repr(k), v) for k, v in value.items()]
    if isinstance(value, list | tuple):
        return [(str(i), v) for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        return [(repr(v), v) for v in sorted(value, key=repr)]
    fields = getattr(value, "__dict__", None)
    if isinstance(fields, dict) and type(value).__module__.startswith("fedrot"):
        return list(fields.items())
    slots = getattr(type(value), "__slots__", ())
    return [(name, getattr(value, name)) for name in slots if hasattr(value, name)]


def snapshot(server: FederationServer) -> Snapshot:
    aggregator = server.worker._aggregator  # noqa: SLF001 - the running sums of the round
    return Snapshot(database_rows(server), state_files(server), open_round(server),
                    object_leaves(aggregator))  # fmt: skip


class ServerThread:
    """A server with a synthetic initial adapter on its own event loop thread (for sync tests)."""

    def __init__(self, settings: ServerSettings, initial: Adapter) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fedrot-server",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        self.server = self.call(start_server(settings, initializer=initializer_of(initial)))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def run(self, function: Any) -> Any:
        """Run ``function()`` on the server's loop (a consistent view of its state)."""

        async def wrapped() -> Any:
            return function()

        return self.call(wrapped())

    def stop(self) -> None:
        try:
            self.call(self.server.stop(grace_s=0.5))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()
