"""What the server reads for a run (held-out data, labels, model) is checked at start: a bad
value is refused before anything serves, in one line naming the file, line and field (it used
to pass the start and fail at round 0's close, and at every restart)."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import fedrot_client.data
from fedrot_client.wordnet import LEXNAMES
from fedrot_server.main import default_seams, main
from fedrot_server.runs.spec import RunSpec
from harness import ServerThread, evaluation_on, held_out, tiny_settings, token_of

TEXT = "a gloss of some word"
REFUSAL_S = 120  # a server that was not refused serves on, waiting for clients


@contextmanager
def refused_within(seconds: int = REFUSAL_S) -> Iterator[None]:
    """Fail (rather than hang) when ``main`` is still serving after ``seconds``."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still serving after {seconds} s: not refused at start")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def argv_of(tmp_path: Path, *flags: str) -> list[str]:
    return ["--tokens", f"alice={token_of('alice')}", "--state-dir", str(tmp_path / "state"),
            "--listen", "127.0.0.1:0", "--dashboard-listen", "", *flags]  # fmt: skip


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def lexname_rows(path: Path, size: int, bad_line: int) -> Path:
    """``size`` rows labelled with WordNet's lexnames; line ``bad_line`` misspells its label."""
    rows = [{"text": TEXT, "label": LEXNAMES[k % len(LEXNAMES)]} for k in range(size)]
    rows[bad_line - 1]["label"] = "noun.artifactt"
    return write_lines(path, [json.dumps(row) for row in rows])


def refusal(tmp_path: Path, caplog: pytest.LogCaptureFixture, *flags: str) -> str:
    """Run ``main`` with ``flags``: it exits 2 with one logged line, and nothing was started."""
    with caplog.at_level(logging.ERROR, logger="fedrot_server"), refused_within():
        assert main(argv_of(tmp_path, *flags)) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "\n" not in line
    return line


def test_a_misspelled_label_is_refused_at_start_by_the_entry_point(tmp_path: Path) -> None:
    data = lexname_rows(tmp_path / "eval.jsonl", 30, bad_line=17)
    labels = json.dumps(list(LEXNAMES))
    command = [str(Path(sys.executable).parent / "fedrot-server"),
               *argv_of(tmp_path, "--model.labels", labels, "--evaluation.data", str(data))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=REFUSAL_S,
                          check=False)
    assert done.returncode == 2
    (line,) = [text for text in done.stderr.splitlines() if text.strip()]
    assert f"evaluation.data {data}:17: field 'label': unknown label 'noun.artifactt'" in line
    assert "(45 labels)" in line
    assert not (tmp_path / "state").exists()  # no store, no run, no round


@pytest.mark.parametrize("num_labels", [45, 2])
def test_labels_that_are_not_the_models_classes_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], num_labels: int
) -> None:
    labels = json.dumps(list(LEXNAMES[:39]))
    flags = ("--model.num-labels", str(num_labels), "--model.labels", labels)
    with refused_within():
        assert main(argv_of(tmp_path, *flags)) == 2
    assert f"model: Value error, labels has 39 names but num_labels is {num_labels}" in (
        capsys.readouterr().err
    )


def test_a_row_without_its_text_field_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_lines(tmp_path / "eval.jsonl", ['{"text": "red", "label": 1}',
                                                '{"txt": "blue", "label": 0}'])  # fmt: skip
    line = refusal(tmp_path, caplog, "--evaluation.data", str(data))
    assert line == f"evaluation.data {data}:2: missing text field 'text' (fields: ['label', 'txt'])"
    assert not (tmp_path / "state").exists()


def test_a_line_that_is_not_json_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_lines(tmp_path / "eval.jsonl", ['{"text": "red", "label": 1}'] * 2
                       + ['{"text": "blue", "label": 0']  # fmt: skip
    )
    line = refusal(tmp_path, caplog, "--evaluation.data", str(data))
    assert line.startswith(f"evaluation.data {data}:3: not valid JSON")


def test_an_instruction_row_without_its_completion_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_lines(tmp_path / "eval.jsonl", ['{"prompt": "2+2=", "completion": "4"}',
                                                '{"prompt": "3+3=", "answer": "6"}'])  # fmt: skip
    line = refusal(tmp_path, caplog, "--model.name", "tiny-llama", "--model.task", "causal-lm",
                   "--lora.target-modules", '["q_proj", "v_proj"]',
                   "--evaluation.data", str(data))  # fmt: skip
    assert line == f"evaluation.data {data}:2: missing field 'completion'"


def test_an_unknown_model_is_refused_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    line = refusal(tmp_path, caplog, "--model.name", "tiny-bertt")
    assert line.startswith("model: unknown model 'tiny-bertt'")


def test_a_good_file_starts(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path / "state", evaluation=evaluation_on(held_out(tmp_path)))
    server = ServerThread(settings)
    try:
        assert server.server.port > 0
    finally:
        server.stop()


def test_the_held_out_rows_are_read_once_at_start_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = held_out(tmp_path)  # 24 rows of classes 0..3
    read = fedrot_client.data.read_rows
    reads: list[Path] = []
    monkeypatch.setattr(fedrot_client.data, "read_rows",
                        lambda path, split: reads.append(path) or read(path, split))  # fmt: skip
    settings = tiny_settings(tmp_path / "state", evaluation=evaluation_on(data))
    initializer, evaluator = default_seams(settings)
    assert reads == [data] and evaluator is not None
    metrics = evaluator(initializer(RunSpec.from_settings(settings)).adapter)
    assert metrics["num_samples"] == 24 and 0.0 <= metrics["accuracy"] <= 1.0
    assert reads == [data]
