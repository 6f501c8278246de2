"""A real federation for the integration tests: the server in-process, the clients as processes.

The ``fedrot-server`` stack (:func:`fedrot_server.service.start_server` with the production
model seams) runs on its own asyncio loop in a background thread, bound to 127.0.0.1 port 0.
Every client is a separate ``python -m fedrot_client.main`` process (separate processes keep
their seeded model construction apart, as on real machines). Importable as ``harness`` (pytest
puts this folder on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedrot_server.main import default_seams
from fedrot_server.service import FederationServer, start_server
from fedrot_server.run_settings import (
    EvaluationSettings,
    LoraSettings,
    ModelSettings,
    StrategySettings,
    TrainingSettings,
)
from fedrot_server.settings import ServerSettings
from fedrot_server.storage.store import open_reader

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
CLIENT_WAIT_S = 300.0  # a bound on how long a test waits for a client process

# Four classes a tiny BERT can tell apart from their words.
CLASS_WORDS = (
    ("apple", "pear", "plum", "fig"),
    ("red", "blue", "green", "pink"),
    ("run", "jump", "swim", "walk"),
    ("one", "two", "three", "four"),
)


def token_of(name: str) -> str:
    return f"token-of-{name}-0123456789"


CLIENT_NAMES = ("alice", "bob", "carol")


def tiny_settings(state_dir: Path, **overrides: object) -> ServerSettings:
    """A 2-round, 3-client tiny-BERT run (4 classes) on 127.0.0.1 port 0."""
    values: dict[str, object] = dict(
        listen="127.0.0.1:0",
        dashboard_listen="",  # no fixed port in tests; the dashboard tests turn it on
        state_dir=state_dir,
        model=ModelSettings(name="tiny-bert", num_labels=4, seed=0),
        lora=LoraSettings(rank=2, alpha=4.0, dropout=0.0, target_modules=["query", "value"]),
        strategy=StrategySettings(name="fedrot", alignment_strength=0.4, odd_round_factor="A"),
        training=TrainingSettings(local_steps=3, batch_size=16, learning_rate=0.05,
                                  optimizer="sgd", max_length=32),  # fmt: skip
        rounds=2,
        min_clients=3,
        tokens={name: token_of(name) for name in (*CLIENT_NAMES, "dave")},
        round_deadline_s=120.0,
        heartbeat_interval_s=1.0,
        max_task_wait_s=5.0,
        linger_s=0.0,
        device="cpu",
    )
    values.update(overrides)
    return ServerSettings(**values)


def evaluation_on(path: Path) -> EvaluationSettings:
    return EvaluationSettings(data=path, batch_size=64)


def write_examples(path: Path, labels: Sequence[int], seed: int) -> Path:
    """JSONL ``{"text", "label"}`` rows, one per label, with words of that label's class."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for label in labels:
            words = [rng.choice(CLASS_WORDS[label]) for _ in range(3)]
            handle.write(json.dumps({"text": " and ".join(words), "label": label}) + "\n")
    return path


def client_shards(folder: Path, sizes: Sequence[int]) -> list[Path]:
    """Label-skewed shards: client ``i`` holds mostly classes ``i`` and ``i + 1``."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, size in enumerate(sizes):
        labels = [(index + k % 3 // 2) % len(CLASS_WORDS) for k in range(size)]
        shards.append(write_examples(folder / f"client-{index}.jsonl", labels, seed=index))
    return shards


def held_out(folder: Path, size: int = 24) -> Path:
    labels = [k % len(CLASS_WORDS) for k in range(size)]
    return write_examples(folder / "eval.jsonl", labels, seed=100)


class ServerThread:
    """A started federation server on its own event loop thread."""

    def __init__(self, settings: ServerSettings, *, evaluate: bool = True) -> None:
        self.settings = settings
        self._start_loop()
        initializer, evaluator = default_seams(settings)
        self.server: FederationServer = self.call(
            start_server(settings, initializer=initializer,
                         evaluator=evaluator if evaluate else None)  # fmt: skip
        )

    def _start_loop(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fedrot-server",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def run_id(self) -> str:
        return self.server.spec.run_id

    @property
    def run_dir(self) -> Path:
        return self.settings.state_dir / "runs" / self.run_id

    def wait_finished(self, timeout: float = CLIENT_WAIT_S) -> None:
        self.call(self.server.engine.wait_finished(), timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.stop(grace_s=1.0))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()

    def report(self, round_index: int) -> dict[str, Any]:
        return json.loads((self.run_dir / "rounds" / str(round_index) / "report.json").read_text())

    def sample_counts(self, round_index: int) -> dict[str, int]:
        reader = open_reader(self.settings.database_path)
        try:
            return {u.client: u.sample_count for u in reader.uploads(self.run_id, round_index)}
        finally:
            reader.close()


@dataclass
class ClientProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    def wait(self, timeout: float = CLIENT_WAIT_S) -> int:
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text()


@dataclass
class Clients:
    """Client processes of one test; :meth:`stop` ends the ones still running."""

    folder: Path
    started: list[ClientProcess] = field(default_factory=list)

    def start(
        self,
        name: str,
        server: str,
        data: Path,
        *,
        extra: Sequence[str] = (),
        script: Path | None = None,
        env: dict[str, str] | None = None,
        pipe: bool = False,
    ) -> ClientProcess:
        """``python -m fedrot_client.main`` (or ``script``) for client ``name``; its output goes
        to ``<folder>/<name>.log``, or to a pipe when ``pipe``."""
        log_path = self.folder / f"{name}.log"
        entry = [str(script)] if script else ["-m", "fedrot_client.main"]
        command = [sys.executable, *entry, "--server", server, "--data", str(data),
                   "--state-dir", str(self.folder / name), "--num-threads", "1",
                   "--device", "cpu", "--backoff-initial-s", "0.1", "--backoff-max-s", "1",
                   *extra]  # fmt: skip
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "FEDROT_CLIENT_TOKEN": token_of(name),
                       **(env or {})}  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        output = subprocess.PIPE if pipe else log_path.open("w")
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   env=environment, text=True)  # fmt: skip
        if not pipe:
            output.close()
        self.started.append(ClientProcess(name, process, log_path))
        return self.started[-1]

    def stop(self) -> None:
        for client in self.started:
            if client.process.poll() is None:
                client.process.kill()
                client.process.wait()
            if client.process.stdout is not None:
                client.process.stdout.close()
