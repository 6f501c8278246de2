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


WORDS = {"good": ("fine", "great", "nice"), "bad": ("awful", "poor", "sad"),
         "colour": ("red", "blue", "green")}  # fmt: skip


def write_user_data(folder: Path) -> tuple[Path, Path]:
    """A CSV training file and a JSONL held-out file with the fields ``sentence`` and ``y``."""
    names = list(WORDS)
    train = folder / "train.csv"
    with train.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "y"])
        writer.writerows([" ".join(WORDS[names[i % 3]]), names[i % 3]] for i in range(60))
    held_out = folder / "test.jsonl"
    held_out.write_text("".join(json.dumps({"sentence": " ".join(WORDS[names[i % 3]][::-1]),
                                            "y": names[i % 3]}) + "\n" for i in range(9)))
    return train, held_out


DATA_FIELDS = ["--text-field", "sentence", "--label-field", "y"]


def test_simulate_on_users_data(tmp_path, capsys):
    train, held_out = write_user_data(tmp_path)
    out = tmp_path / "run"
    status = main(["simulate", "--data", str(train), "--eval-data", str(held_out), *DATA_FIELDS,
                   "--clients", "2", "--out", str(out), "--no-plot", *TINY_FLAGS])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    content = json.loads((out / "metrics.json").read_text())
    assert content["config"]["model"]["num_labels"] == 3  # read off the data
    assert content["config"]["extra"]["data"] == str(train)
    assert content["config"]["extra"]["eval_data"] == str(held_out)
    assert content["summary"]["final_accuracy"] in {i / 9 for i in range(10)}  # 9 held-out rows


def test_users_data_is_split_like_wordnet(tmp_path):
    from fedrot_client.simulation import file_federation
    from fedrot_client.user_data import load_user_files
    from fedrot_client.data import FieldNames

    train, held_out = write_user_data(tmp_path)
    fields = FieldNames("sentence", "y")
    one = load_user_files([train], classification=True, fields=fields)
    pooled = file_federation(one, 3, alpha=0.1, seed=0, eval_size=12, per_client=10)
    assert len(pooled.evaluation) == 12 and all(0 < len(c) <= 10 for c in pooled.clients)
    assert pooled.skew > 0.2
    both = load_user_files([train, held_out], classification=True, fields=fields)
    separate = file_federation(both, 3, alpha=0.1, seed=0, eval_size=12, per_client=None)
    assert len(separate.evaluation) == 9 and sum(len(c) for c in separate.clients) == 60


@pytest.mark.parametrize(("content", "named"), [
    ("sentence,y\nfine,good\nnice\n", "train.csv:3: missing label field 'y'"),
    ("sentence,y\nfine,good\n,bad\n", "train.csv:3: field 'sentence' must be a non-empty string"),
    ("text\nfine\n", "train.csv:2: no label field 'y'"),
])  # fmt: skip
def test_a_bad_data_file_is_one_line_usage_error(tmp_path, capsys, content, named):
    data = tmp_path / "train.csv"
    data.write_text(content)
    status = main(["simulate", "--data", str(data), *DATA_FIELDS, "--out", str(tmp_path / "o"),
                   *TINY_FLAGS])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err
    assert err.startswith("fedrot: error: simulate: ") and named in err


def test_data_options_that_disagree_are_one_line_usage_errors(tmp_path, capsys):
    train, _ = write_user_data(tmp_path)
    status = main(["simulate", "--data", str(train), *DATA_FIELDS, "--num-labels", "4",
                   "--out", str(tmp_path / "o"), *TINY_FLAGS])  # fmt: skip
    assert status == 2 and "--num-labels 4 but" in capsys.readouterr().err
    status = main(["simulate", "--eval-data", str(train), "--out", str(tmp_path / "o"),
                   *TINY_FLAGS])  # fmt: skip
    assert status == 2 and "go with --data" in capsys.readouterr().err


def test_instruction_data_is_refused_in_one_line(tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"prompt": "2 + 2 =", "completion": " 4"}) + "\n")
    status = main(["simulate", "--task", "causal-lm", "--data", str(chats),
                   "--out", str(tmp_path / "o"), *TINY_FLAGS])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err
    assert "prompt-completion rows are instruction data" in err


def test_causal_lm_on_plain_text_is_split_by_its_label_field(tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"word{i % 5}: a thing of kind {i % 3}",
                                        "label": f"kind{i % 3}"}) + "\n" for i in range(60)))
    out = tmp_path / "run"
    status = main(["simulate", "--task", "causal-lm", "--model", "tiny-llama", "--target-modules",
                   "q_proj,v_proj", "--data", str(data), "--alpha", "0.1", "--out", str(out),
                   "--no-plot", *TINY_FLAGS[2:], "--rounds", "1", "--eval-size", "10",
                   "--per-client", "15"])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["final_perplexity"] > 1.0 and summary["label_skew"] > 0.2
