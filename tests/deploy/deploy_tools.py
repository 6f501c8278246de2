"""What the deployment-file tests share: the repository, this venv's tools, the Compose CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is not installed in {BIN}: run `make venv` (the dev extra)"
    return str(path)


def compose(
    *args: str, env_file: Path | None = REPO / ".env.example", cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """The Compose CLI in ``cwd`` with nothing of this process's environment; ``env_file``
    None: no env file at all (only a ``.env`` in ``cwd`` would count)."""
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    options = [] if env_file is None else ["--env-file", str(env_file)]
    return subprocess.run(
        [tool("docker-compose"), *options, *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def validate_kubernetes(path: Path) -> subprocess.CompletedProcess:
    """``kubernetes-validate --strict`` (schemas shipped in its PyPI package) of one file."""
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
