"""``synthetic_server.py`` as a process a test can SIGKILL, and read: importable as
``server_process`` from the tests in this folder."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from fedrot_server.settings import ServerSettings

HERE = Path(__file__).resolve().parent
SERVING = re.compile(r"serving (\S+) on port (\d+)")


class ServerProcess:
    """``synthetic_server.py`` with the given settings (and its ``extra`` arguments);
    ``run_id`` and ``address`` once serving; :meth:`line` reads what it prints next."""

    def __init__(self, settings: ServerSettings, log: Path, *extra: str) -> None:
        config = log.with_suffix(".json")
        config.write_text(json.dumps(settings.model_dump(mode="json", exclude={"config"})))
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "synthetic_server.py"), str(config), *extra],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip
        line = self.line()
        found = SERVING.search(line)
        assert found, f"no serving line: {line!r}; log: {log.read_text()}"
        self.run_id, self.address = found.group(1), f"127.0.0.1:{found.group(2)}"

    def line(self) -> str:
        """The next line the server prints (blocks until it does, or exits)."""
        assert self.process.stdout is not None
        return self.process.stdout.readline()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(60)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self._log.close()
