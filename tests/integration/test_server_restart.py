"""A server that dies (SIGKILL) and comes back on the same address with a new run: the waiting
client retries with backoff while it is away, then enrols again and serves the new run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from fedrot_server.settings import ServerSettings
from harness import CLIENT_WAIT_S, client_shards, tiny_settings

PORT_LINE = re.compile(r"serving \S+ on port (\d+)")


def start_server_process(settings: ServerSettings, log: Path, *, pipe: bool) -> subprocess.Popen:
    """``fedrot-server`` with ``settings``; its output goes to a pipe or to ``log``."""
    config = log.with_suffix(".json")
    config.write_text(json.dumps(settings.model_dump(mode="json", exclude={"config"})))
    with log.open("w") as file:
        return subprocess.Popen(
            [sys.executable, "-m", "fedrot_server.main", "--config", str(config)],
            stdout=subprocess.PIPE if pipe else file, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip


def read_until(process: subprocess.Popen, pattern: re.Pattern[str] | str) -> re.Match[str]:
    """Read ``process``'s output line by line until ``pattern`` matches (or it ends)."""
    assert process.stdout is not None
    for line in process.stdout:
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"output ended without a line matching {pattern!r}")


def test_client_survives_a_server_crash_and_joins_the_restarted_server(
    clients, tmp_path: Path
) -> None:
    shard = client_shards(tmp_path / "data", sizes=(8,))[0]
    first = start_server_process(
        tiny_settings(tmp_path / "first", min_clients=9, max_task_wait_s=600.0, linger_s=60.0),
        tmp_path / "first-server.log",
        pipe=True,
    )
    second = None
    try:
        port = int(read_until(first, PORT_LINE).group(1))
        client = clients.start("alice", f"127.0.0.1:{port}", shard, pipe=True,
                               extra=["--max-wait-s", "600"])  # fmt: skip
        read_until(client.process, "loaded 8 examples")  # it is about to long-poll the first
        first.send_signal(signal.SIGKILL)
        first.wait(CLIENT_WAIT_S)
        read_until(client.process, "GetTask: UNAVAILABLE")  # retrying while the server is away
        second = start_server_process(
            tiny_settings(tmp_path / "second", listen=f"127.0.0.1:{port}", rounds=1,
                          min_clients=1, linger_s=5.0),  # fmt: skip
            tmp_path / "second-server.log",
            pipe=False,
        )
        read_until(client.process, "enrolling again")
        rest = client.process.stdout.read()  # type: ignore[union-attr]
        assert client.wait() == 0, rest
        assert "round 0: update accepted" in rest and "done after 1 rounds" in rest
        assert second.wait(CLIENT_WAIT_S) == 0
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
            if process is not None and process.stdout is not None:
                process.stdout.close()
