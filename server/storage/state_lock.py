"""One server per state folder: an exclusive ``flock`` on ``<state_dir>/.lock``, held while the
server runs and released by the kernel when its process dies (a SIGKILL leaves no stale lock).
Two servers on one folder would each resume the same run and overwrite each other's rounds."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fedrot_server.errors import SettingsError

LOCK_FILE = ".lock"


class StateDirLock:
    """The held lock of one state folder; :meth:`release` (idempotent) lets it go."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            self.release()
            raise SettingsError(
                f"state_dir {state_dir} is in use by another fedrot-server (pid {holder}); "
                "give each server its own state_dir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
