"""The run folders the dashboard reads: round reports and global adapters (PEFT directories).

Layout (written by :mod:`fedrot_server.storage.artifacts`): ``<root>/<run_id>/initial/adapter/`` and
``<root>/<run_id>/rounds/<t>/adapter/`` hold ``adapter_config.json`` and the safetensors
weights; ``rounds/<t>/report.json`` the round's report. Read-only, no tensors: files are
served as they are. Blocking: call off the event loop.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class AdapterFiles:
    """A saved global adapter: its folder, its safetensors file and that file's sha256."""

    folder: Path
    weights: Path
    sha256: str
    size_bytes: int


class RunFiles:
    """Finds and reads the files of the runs under ``root`` (``<state_dir>/runs``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._digests: dict[tuple[Path, int, int], str] = {}
        self._reports: dict[tuple[Path, int, int], dict[str, Any]] = {}

    def run_dir(self, run_id: str) -> Path:
        if not RUN_ID.fullmatch(run_id):
            raise ValueError(f"not a run id: {run_id!r}")
        return self.root / run_id

    def adapter_dir(self, run_id: str, round_index: int | None) -> Path:
        """The PEFT folder of round ``round_index``'s output (None: the initial adapter)."""
        run = self.run_dir(run_id)
        base = run / "initial" if round_index is None else run / "rounds" / str(round_index)
        return base / "adapter"

    def adapter(self, run_id: str, round_index: int | None) -> AdapterFiles | None:
        """The saved adapter of a round (None: initial), or None when there is none."""
        folder = self.adapter_dir(run_id, round_index)
        weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if not weights:
            return None
        stat = weights[0].stat()
        return AdapterFiles(folder, weights[0], self._sha256(weights[0]), stat.st_size)

    def report(self, run_id: str, round_index: int) -> dict[str, Any] | None:
        """Round ``round_index``'s ``report.json`` (None when missing or unreadable)."""
        path = self.run_dir(run_id) / "rounds" / str(round_index) / "report.json"
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (path, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._reports.get(key)
        if cached is None:
            try:
                cached = json.loads(path.read_text())
            except (OSError, ValueError):
                return None
            with self._lock:
                self._reports[key] = cached
        return cached

    def _sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            known = self._digests.get(key)
        if known is None:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while block := handle.read(HASH_BLOCK):
                    digest.update(block)
            known = digest.hexdigest()
            with self._lock:
                self._digests[key] = known
        return known


class ZipCache:
    """Zips of adapter folders for download, each made once (named by the adapter and its
    weights' sha256) in a private temporary folder that goes with the process; the ``keep``
    most recently asked for stay. A zip that stays, rather than one per request deleted after
    sending, leaves nothing behind when a response ends early (a refused Range header, a
    dropped connection). One evicted while still being sent is read to its end (an unlinked
    file lives while it is open)."""

    def __init__(self, keep: int = 8) -> None:
        self._lock = threading.Lock()
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._kept: OrderedDict[Path, None] = OrderedDict()
        self._keep = keep

    def zip_of(self, files: AdapterFiles, prefix: str) -> Path:
        """The zip of ``files.folder``'s files under ``prefix/``."""
        with self._lock:
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="fedrot-zips-")
            target = Path(self._folder.name) / f"{prefix}-{files.sha256[:16]}.zip"
            if not target.exists():
                _write_zip(files.folder, prefix, target)
            self._kept[target] = None
            self._kept.move_to_end(target)
            while len(self._kept) > self._keep:
                oldest, _ = self._kept.popitem(last=False)
                oldest.unlink(missing_ok=True)
            return target


def _write_zip(folder: Path, prefix: str, target: Path) -> None:
    """``folder``'s files under ``prefix/`` into ``target``, whole or not at all."""
    partial = target.with_suffix(".partial")
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                archive.write(path, f"{prefix}/{path.name}")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
