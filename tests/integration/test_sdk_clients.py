"""SDK clients against a real fedrot-server (in-process, 127.0.0.1 port 0), as processes.

The three examples in examples/ (a plain PyTorch loop, a HF Trainer, TRL's SFTTrainer) each
run a 2-client, 2-round RoLoRA federation of a tiny causal LM (round 1 freezes A, so the
examples must respect the round's factors); and an SDK client killed or stopped mid-round and
started again with its state folder neither trains a round twice nor loses its update.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file
from transformers import AutoTokenizer

from fedrot_server.run_settings import (
    LoraSettings,
    ModelSettings,
    StrategySettings,
    TrainingSettings,
)
from fedrot_server.storage.store import open_reader
from harness import ServerThread, tiny_settings, token_of

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SDK_CLIENT = Path(__file__).resolve().parent / "sdk_client.py"
WAIT_S = 300.0
WEIGHTS = "adapter_model.safetensors"


def llm_settings(state_dir: Path, **overrides: object):
    values: dict[str, object] = dict(
        model=ModelSettings(name="tiny-llama", task="causal-lm", seed=0),
        lora=LoraSettings(rank=2, alpha=4.0, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        strategy=StrategySettings(name="rolora"),
        training=TrainingSettings(local_steps=2, batch_size=4, learning_rate=0.01,
                                  optimizer="adamw", max_length=32),  # fmt: skip
        min_clients=2,
    )
    values.update(overrides)
    return tiny_settings(state_dir, **values)


def write_sums(path: Path, offset: int) -> Path:
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)}
            for a in range(offset, offset + 4) for b in range(4)]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def start_client(script: Path, name: str, server: ServerThread, folder: Path,
                 *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "FEDROT_CLIENT_SERVER": server.address,
                   "FEDROT_CLIENT_TOKEN": token_of(name),
                   "FEDROT_CLIENT_STATE_DIR": str(folder / name),
                   "FEDROT_CLIENT_BACKOFF_INITIAL_S": "0.1", "FEDROT_CLIENT_BACKOFF_MAX_S": "1",
                   "OMP_NUM_THREADS": "1", **(env or {})}  # fmt: skip
    (folder / name).mkdir(parents=True, exist_ok=True)
    log = (folder / f"{name}.log").open("a")
    return subprocess.Popen([sys.executable, str(script), *args], stdout=log,
                            stderr=subprocess.STDOUT, env=environment, text=True)  # fmt: skip


def published(server: ServerThread, round_index: int) -> Path:
    """The global adapter round ``round_index`` produced, as the server published it."""
    return server.run_dir / "rounds" / str(round_index) / "adapter" / WEIGHTS


def uploads(server: ServerThread, round_index: int) -> list:
    reader = open_reader(server.settings.database_path)
    try:
        return list(reader.uploads(server.run_id, round_index))
    finally:
        reader.close()


@pytest.mark.parametrize("example", ["pytorch_loop.py", "hf_trainer.py", "trl_sft.py"])
def test_an_example_client_runs_a_federation(example: str, tmp_path: Path) -> None:
    server = ServerThread(llm_settings(tmp_path / "server"), evaluate=False)
    names = ("alice", "bob")
    try:
        clients = [start_client(EXAMPLES / example, name, server, tmp_path,
                                str(write_sums(tmp_path / f"{name}.jsonl", 3 * index)),
                                "--out", str(tmp_path / name / "final"))
                   for index, name in enumerate(names)]  # fmt: skip
        codes = [client.wait(WAIT_S) for client in clients]
        logs = {name: (tmp_path / f"{name}.log").read_text() for name in names}
        assert codes == [0, 0], logs
        server.wait_finished(60)
        for round_index in (0, 1):
            assert sorted(server.report(round_index)["summary"]["reporters"]) == list(names)
            assert all(u.sample_count > 0 for u in uploads(server, round_index))
            assert published(server, round_index).is_file()
        final = load_file(str(tmp_path / "alice" / "final" / WEIGHTS))
        served = load_file(str(published(server, 1)))
        assert final.keys() == served.keys()
        assert all(torch.equal(final[k], served[k]) for k in final)  # bit for bit
        assert any(k.endswith(".lora_B.weight") and t.abs().max() > 0 for k, t in final.items())
        for folder in (tmp_path / "alice" / "final", published(server, 1).parent):
            # Offline, from the folder alone: the config names a local copy of the base model.
            model = AutoPeftModelForCausalLM.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(model.peft_config["default"]
                                                      .base_model_name_or_path)  # fmt: skip
            inputs = tokenizer("1+2=", return_tensors="pt")
            assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > 4
    finally:
        server.stop()


def test_sigterm_while_joining_an_absent_server_exits_quietly(tmp_path: Path) -> None:
    """A stop during enrolment (the server is away: backoff) ends the process with status 0 and
    no traceback, although the with block never started."""
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    absent = SimpleNamespace(address=f"127.0.0.1:{port}")
    client = start_client(SDK_CLIENT, "alice", absent, tmp_path)  # type: ignore[arg-type]
    log = tmp_path / "alice.log"
    deadline = time.monotonic() + WAIT_S
    while "Enroll: UNAVAILABLE" not in log.read_text() and time.monotonic() < deadline:
        assert client.poll() is None, log.read_text()
        time.sleep(0.1)
    client.send_signal(signal.SIGTERM)
    assert client.wait(60) == 0
    assert "Traceback" not in log.read_text(), log.read_text()


def one_client_settings(tmp_path: Path):
    return llm_settings(tmp_path / "server", min_clients=1, strategy=StrategySettings(name="fedit"))


def trained_rounds(tmp_path: Path) -> list[str]:
    return (tmp_path / "alice" / "trained.log").read_text().split("\n")[:-1]


@pytest.mark.parametrize("fault", ["saved", "accepted"])
def test_a_killed_client_neither_trains_twice_nor_loses_its_update(
    fault: str, tmp_path: Path
) -> None:
    server = ServerThread(one_client_settings(tmp_path), evaluate=False)
    try:
        first = start_client(SDK_CLIENT, "alice", server, tmp_path,
                             env={"FEDROT_TEST_DIE_AT": fault})  # fmt: skip
        assert first.wait(WAIT_S) == 9, (tmp_path / "alice.log").read_text()
        (saved,) = (tmp_path / "alice" / "runs").glob("*/pending.json")  # the run's folder
        pending = json.loads(saved.read_text())
        again = start_client(SDK_CLIENT, "alice", server, tmp_path)
        assert again.wait(WAIT_S) == 0, (tmp_path / "alice.log").read_text()
        server.wait_finished(60)
        assert trained_rounds(tmp_path) == ["trained 0", "trained 1"]
        (round0,) = uploads(server, 0)
        assert round0.sha256 == pending["sha256"]  # the saved update, sent once
        assert len(uploads(server, 1)) == 1
        assert "finished" in (tmp_path / "alice.log").read_text()
    finally:
        server.stop()


def test_sigterm_in_the_users_training_stops_quietly_and_a_restart_goes_on(
    tmp_path: Path,
) -> None:
    server = ServerThread(one_client_settings(tmp_path), evaluate=False)
    try:
        first = start_client(SDK_CLIENT, "alice", server, tmp_path,
                             env={"FEDROT_TEST_DIE_AT": "training"})  # fmt: skip
        ready = tmp_path / "alice" / "training"
        deadline = time.monotonic() + WAIT_S
        while not ready.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), (tmp_path / "alice.log").read_text()
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
        log = (tmp_path / "alice.log").read_text()
        assert "stopped" in log and "Traceback" not in log, log
        assert uploads(server, 0) == []  # not withdrawn either: the server still waits for us
        again = start_client(SDK_CLIENT, "alice", server, tmp_path)
        assert again.wait(WAIT_S) == 0, (tmp_path / "alice.log").read_text()
        server.wait_finished(60)
        assert trained_rounds(tmp_path) == ["trained 0", "trained 1"]
        assert [len(uploads(server, r)) for r in (0, 1)] == [1, 1]
        assert published(server, 0).is_file() and published(server, 1).is_file()
    finally:
        server.stop()
