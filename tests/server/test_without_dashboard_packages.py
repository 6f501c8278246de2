"""fedrot-server without the `server` extra (fastapi, uvicorn): it imports, runs without the
dashboard, and asking for the dashboard is one line that names the extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BLOCKED = "import sys\nfor name in ('fastapi', 'uvicorn'):\n    sys.modules[name] = None\n"


def run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED + code], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip


def test_the_server_imports_without_the_dashboard_packages(tmp_path: Path) -> None:
    done = run("import fedrot_server.main, fedrot_server.service\nprint('imported')", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout


def test_asking_for_the_dashboard_without_its_packages_is_one_line(tmp_path: Path) -> None:
    code = ("from fedrot_server.main import main\n"
            "sys.exit(main(['--tokens', 'alice=token-alice-0123456789', '--listen', "
            "'127.0.0.1:0', '--dashboard-listen', '127.0.0.1:0', '--state-dir', 'state']))\n")  # fmt: skip
    done = run(code, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "install the server extra" in done.stderr and "Traceback" not in done.stderr
