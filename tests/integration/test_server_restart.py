"""A server that dies (SIGKILL) and comes back.

With another state directory it starts a new run: the waiting client retries with backoff while
it is away, then enrols again and serves the new run. With the same state directory it resumes
the run: real clients, connected through a proxy that also cuts every connection mid-transfer,
finish the federation without training any round twice, and every round's adapter is the
aggregate of that round's recorded uploads in their recorded order."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import queue
import threading

import pytest
import torch

from cutting_proxy import CuttingProxy
from fedrot.adapters import AdapterSchema
from fedrot.codec import ADAPTER_WEIGHTS_FILE, decode_adapter
from fedrot.strategies import StrategyConfig, build_strategy
from fedrot_server.settings import ServerSettings
from fedrot_server.storage.state import RunPhase
from fedrot_server.storage.store import open_reader
from harness import CLIENT_NAMES, CLIENT_WAIT_S, client_shards, tiny_settings

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


class OutputLines:
    """Reads a process's output on a thread (so its pipe never fills); ``wait_for`` blocks
    until a line matches."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, pattern: str) -> re.Match[str]:
        while True:
            line = self._new.get(timeout=CLIENT_WAIT_S)
            if line is None:
                raise AssertionError(f"output ended without {pattern!r}:\n{''.join(self.lines)}")
            self.lines.append(line)
            found = re.search(pattern, line)
            if found:
                return found


def expected_round(run_dir: Path, round_index: int, rows: list) -> dict[str, torch.Tensor]:
    """The core's aggregate of round ``round_index``'s spooled uploads in recorded order."""
    start = run_dir / ("initial" if round_index == 0 else f"rounds/{round_index - 1}")
    reference = decode_adapter((start / "adapter" / ADAPTER_WEIGHTS_FILE).read_bytes()).to_adapter()
    strategy = build_strategy("fedrot", StrategyConfig(lam=0.4, align_first="A", seed=0))
    plan = strategy.plan(round_index)
    aggregator = strategy.start_round(reference, plan, device="cpu", track_error=False)
    for row in rows:
        payload = (run_dir / f"rounds/{round_index}/uploads/{row.client}.safetensors").read_bytes()
        tensors = decode_adapter(payload, AdapterSchema.of(reference), plan.trained).tensors
        aggregator.add(row.client, reference.with_factors_from(tensors), float(row.sample_count))
    return aggregator.finalize().adapter.to_state_dict()


@pytest.mark.slow
def test_clients_finish_a_resumed_run_through_cut_connections(clients, tmp_path: Path) -> None:
    shards = client_shards(tmp_path / "data", sizes=(8, 8, 8))
    settings = tiny_settings(tmp_path / "state", chunk_bytes=1024, linger_s=60.0,
                             final_download_grace_s=2.0)  # fmt: skip
    proxy = CuttingProxy()
    servers: list[subprocess.Popen] = []
    try:
        servers.append(start_server_process(settings, tmp_path / "first.log", pipe=True))
        first = OutputLines(servers[0])
        proxy.upstream_port = int(first.wait_for(PORT_LINE.pattern).group(1))
        for name, shard in zip(CLIENT_NAMES, shards):
            clients.start(name, proxy.address, shard)
        first.wait_for(r"round 0: accepted \d+ bytes from")
        servers[0].send_signal(signal.SIGKILL)  # in the middle of round 0
        servers[0].wait(CLIENT_WAIT_S)

        servers.append(start_server_process(settings, tmp_path / "second.log", pipe=True))
        second = OutputLines(servers[1])
        resumed = second.wait_for(r"resuming run (\S+): (\d+) rounds closed")
        proxy.upstream_port = int(second.wait_for(PORT_LINE.pattern).group(1))
        second.wait_for(r"round 1 opened")
        proxy.cut_after(4096)  # mid-way through the round-1 downloads (1 KiB chunks)
        for client in clients.started:
            assert client.wait() == 0, client.log()
        assert servers[1].wait(CLIENT_WAIT_S) == 0
    finally:
        proxy.close()
        for process in servers:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
    assert proxy.cuts >= 1
    for client in clients.started:
        log = client.log()
        assert "done after 2 rounds" in log, log
        for round_index in (0, 1):  # no round trained twice, the crash notwithstanding
            assert log.count(f"round {round_index}: trained") == 1, log
    run_id = resumed.group(1)
    reader = open_reader(settings.database_path)
    try:
        assert [r.run_id for r in reader.runs()] == [run_id]
        assert reader.run(run_id).phase is RunPhase.FINISHED
        run_dir = settings.state_dir / "runs" / run_id
        for round_index in (0, 1):
            rows = reader.uploads(run_id, round_index)
            assert sorted(r.client for r in rows) == sorted(CLIENT_NAMES)
            saved = (run_dir / f"rounds/{round_index}/adapter" / ADAPTER_WEIGHTS_FILE).read_bytes()
            got = decode_adapter(saved).tensors
            for key, tensor in expected_round(run_dir, round_index, rows).items():
                torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    finally:
        reader.close()
