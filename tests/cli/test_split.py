"""``fedrot split``: shards, held-out rows, labels.json, tokens and a server.toml that the real
server and client settings accept as they are, and the commands it prints."""

from __future__ import annotations

import json
import shlex
import stat
import tomllib
from pathlib import Path

import pytest

from fedrot.cli import main
from fedrot_client.data import load_dataset
from fedrot_client.settings import load_settings as client_settings
from fedrot_server.checks import PLACEHOLDER_PREFIX
from fedrot_server.settings import load_settings as server_settings
from fedrot_server.settings import read_tokens_file
from fedrot_server.runs.spec import RunSpec

TOPICS = ("sports", "cooking", "weather")


def write_data(path: Path, n: int = 90) -> Path:
    lines = [json.dumps({"sentence": f"a note on {TOPICS[i % 3]} number {i}",
                         "topic": TOPICS[i % 3]}) for i in range(n)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def split(tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str]:
    data = write_data(tmp_path / "notes.jsonl")
    status = main(["split", str(data), "--clients", "3", "--alpha", "0.5", "--eval-size", "15",
                   "--text-field", "sentence", "--label-field", "topic",
                   "--out", str(tmp_path / "out"), *flags])  # fmt: skip
    return status, capsys.readouterr().out


def printed_commands(output: str, program: str) -> list[list[str]]:
    return [shlex.split(line)[1:] for line in output.splitlines()
            if line.strip().startswith(program + " ")]  # fmt: skip


def test_server_and_clients_accept_what_split_writes(tmp_path, capsys) -> None:
    status, output = split(tmp_path, capsys, "--model", "tiny-bert")
    assert status == 0
    out = tmp_path / "out"
    config = tomllib.loads((out / "server.toml").read_text())
    assert config["model"] == {"name": "tiny-bert", "task": "classification",
                               "labels": sorted(TOPICS)}  # fmt: skip
    assert config["model"]["labels"] == json.loads((out / "labels.json").read_text())
    assert "labels" not in config["evaluation"]  # the run's names are model.labels
    # The server's own settings loader and its start check of the held-out rows.
    (server_args,) = printed_commands(output, "fedrot-server")
    settings = server_settings(server_args)
    assert settings.model.num_labels == 3 and settings.min_clients == 3
    from fedrot_server.runs.base_models import HeldOutEvaluator

    HeldOutEvaluator(RunSpec.from_settings(settings), settings.evaluation)  # reads every row
    tokens = settings.client_tokens()
    assert sorted(tokens) == ["client-0", "client-1", "client-2"]
    assert len(set(tokens.values())) == 3
    assert not any(t.lower().startswith(PLACEHOLDER_PREFIX) for t in tokens.values())
    assert read_tokens_file(out / "tokens.txt") == tokens
    # Every client command, parsed by the daemon's settings: its token, its shard, the labels.
    commands = printed_commands(output, "fedrot-client")
    assert len(commands) == 3
    sizes = []
    for index, args in enumerate(commands):
        client = client_settings(args)
        assert client.read_token() == tokens[f"client-{index}"]
        assert stat.S_IMODE(client.token_file.stat().st_mode) == 0o600
        vocabulary = client.label_vocabulary(settings.model.num_labels)
        shard = load_dataset(client.data, vocabulary=vocabulary, fields=client.field_names(True))
        sizes.append(len(shard))
    assert sum(sizes) + 15 == 90
    assert stat.S_IMODE((out / "tokens.txt").stat().st_mode) == 0o600


def test_tokens_are_fresh_each_time(tmp_path, capsys) -> None:
    split(tmp_path, capsys)
    first = (tmp_path / "out" / "tokens.txt").read_text()
    split(tmp_path, capsys)
    assert (tmp_path / "out" / "tokens.txt").read_text() != first


def test_no_held_out_rows_means_no_server_evaluation(tmp_path, capsys) -> None:
    data = write_data(tmp_path / "notes.jsonl")
    status = main(["split", str(data), "--clients", "2", "--alpha", "1", "--eval-size", "0",
                   "--text-field", "sentence", "--label-field", "topic",
                   "--out", str(tmp_path / "out")])  # fmt: skip
    assert status == 0
    config = tomllib.loads((tmp_path / "out" / "server.toml").read_text())
    assert "evaluation" not in config and not (tmp_path / "out" / "eval.jsonl").exists()


def test_labels_with_quotes_and_unicode_survive_the_toml(tmp_path, capsys) -> None:
    names = ['say "hi"', "back\\slash", "naïve ☃", "tab\there"]
    lines = [json.dumps({"text": f"t{i}", "label": names[i % 4]}) for i in range(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert main(["split", str(data), "--clients", "2", "--alpha", "1",
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    settings = server_settings(["--config", str(tmp_path / "out" / "server.toml")])
    assert settings.model.labels == sorted(names) and settings.model.num_labels == 4


@pytest.mark.parametrize(("content", "named"), [
    ('{"sentence": "fine", "topic": "sports"}\n{"sentence": 3, "topic": "sports"}\n',
     "notes.jsonl:2: field 'sentence' must be a non-empty string, got 3"),
    ('{"sentence": "fine", "topic": "sports"}\n{"sentence": "x"}\n',
     "notes.jsonl:2: missing label field 'topic'"),
    ('{"sentence": "fine", "topic": "sports"}\n[1, 2]\n',
     "notes.jsonl:2: expected a JSON object, got list"),
])  # fmt: skip
def test_a_bad_file_is_one_line_exit_2_naming_line_and_field(tmp_path, capsys, content, named):
    data = tmp_path / "notes.jsonl"
    data.write_text(content)
    status = main(["split", str(data), "--clients", "2", "--alpha", "0.5",
                   "--text-field", "sentence", "--label-field", "topic",
                   "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err
    assert err.startswith("fedrot: error: ") and named in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flags", "named"), [
    (["--clients", "0"], "--clients must be >= 1"),
    (["--alpha", "0"], "--alpha must be a positive number"),
    (["--eval-size", "90"], "eval_size 90 must be in 0..89"),
    (["--clients", "200"], "cannot give 200 clients"),
])  # fmt: skip
def test_impossible_splits_are_one_line_errors(tmp_path, capsys, flags, named) -> None:
    data = write_data(tmp_path / "notes.jsonl")
    status = main(["split", str(data), "--clients", "3", "--alpha", "0.5",
                   "--text-field", "sentence", "--label-field", "topic",
                   "--out", str(tmp_path / "out"), *flags])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and named in err and "\n" not in err


def test_instruction_data_for_a_causal_lm(tmp_path, capsys) -> None:
    data = tmp_path / "chats.jsonl"
    chat = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
            for i in range(40)]  # fmt: skip
    data.write_text("".join(json.dumps({"messages": messages, "label": TOPICS[i % 3]}) + "\n"
                            for i, messages in enumerate(chat)))  # fmt: skip
    assert main(["split", str(data), "--task", "causal-lm", "--clients", "2", "--alpha", "0.5",
                 "--model", "smollm2", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    output = capsys.readouterr().out
    settings = server_settings(printed_commands(output, "fedrot-server")[0])
    assert settings.model.task == "causal-lm" and settings.lora.target_modules == ["all-linear"]
    assert settings.evaluation.data == tmp_path / "out" / "eval.jsonl"
    commands = printed_commands(output, "fedrot-client")
    assert all("--labels" not in args for args in commands)
    assert all(client_settings(args).data.is_file() for args in commands)
