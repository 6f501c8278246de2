"""``fedrot simulate`` on the command line: WordNet shards, tiny BERT, files written."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedrot.cli import main

WORDNET = Path("/usr/share/wordnet/data.noun")
needs_wordnet = pytest.mark.skipif(
    not WORDNET.is_file(), reason="Debian wordnet-base is not installed (make debian)"
)

TINY_FLAGS = ["--model", "tiny-bert", "--rounds", "2", "--local-steps", "2", "--batch-size", "4",
              "--per-client", "12", "--eval-size", "16", "--max-length", "16",
              "--threads", "1"]  # fmt: skip


@needs_wordnet
def test_simulate_on_wordnet_writes_metrics_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["simulate", "--strategy", "fedrot", "--lambda", "0.6", "--clients", "3",
                   "--alpha", "0.1", "--out", str(out), *TINY_FLAGS])  # fmt: skip
    assert status == 0
    content = json.loads((out / "metrics.json").read_text())
    assert content["config"]["lam"] == 0.6 and content["config"]["num_clients"] == 3
    assert content["summary"]["label_skew"] > 0.3  # alpha = 0.1 is strongly skewed
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["round_index"] for row in rows] == ["0", "1"]
    assert rows[1]["aligned"] == "A" and float(rows[1]["rotation_distance"]) >= 0.0
    assert (out / "curves.png").stat().st_size > 1000
    assert "fedrot: best_accuracy=" in capsys.readouterr().out


def test_bad_lambda_is_one_line_usage_error(tmp_path, capsys):
    status = main(["simulate", "--lambda", "2", "--out", str(tmp_path), *TINY_FLAGS])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedrot: error: simulate:") and "lambda" in err
    assert "\n" not in err


@pytest.mark.parametrize(("flags", "named"), [
    (["--wordnet-dir", "/nonexistent"], "install Debian's wordnet-base"),
    (["--alpha", "0"], "alpha must be > 0"),
])  # fmt: skip
def test_data_that_cannot_be_made_is_one_line_usage_error(tmp_path, capsys, flags, named):
    status = main(["simulate", "--out", str(tmp_path), *TINY_FLAGS, *flags])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedrot: error: simulate:") and named in err and "\n" not in err


def test_fedrot_cli_does_not_import_transformers():
    code = ("import sys, fedrot.cli; fedrot.cli.build_parser(); "
            "print('transformers' in sys.modules, 'fedrot_client' in sys.modules)")  # fmt: skip
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()  # fmt: skip
    assert output == ["False", "False"]
