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


COLOURS = ("red", "blue", "green", "black", "white")
TINY_LLAMA_FLAGS = ["--task", "causal-lm", "--model", "tiny-llama", "--target-modules",
                    "q_proj,v_proj", "--local-steps", "2", "--batch-size", "4", "--threads", "1",
                    "--max-length", "64", "--max-new-tokens", "6"]  # fmt: skip


def write_chats(path: Path, count: int) -> Path:
    """Chats asking for a colour, the answer the colour; ``kind`` divides the split."""
    path.write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": f"colour {i}?"},
                     {"role": "assistant", "content": COLOURS[i % 5]}],
        "kind": f"k{i % 3}"}) + "\n" for i in range(count)))  # fmt: skip
    return path


def test_simulate_on_instruction_data(tmp_path, capsys):
    """Chat rows train with TRL's SFTTrainer and are scored as the server scores them: exact
    match of the greedy answer and the answer's perplexity, every evaluated round."""
    chats = write_chats(tmp_path / "chats.jsonl", 60)
    out = tmp_path / "run"
    status = main(["simulate", "--strategy", "fedrot", "--lambda", "1", "--data", str(chats),
                   "--label-field", "kind", "--alpha", "0.5", "--clients", "2", "--rounds", "2",
                   "--per-client", "20", "--eval-size", "8", "--out", str(out),
                   *TINY_LLAMA_FLAGS])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    content = json.loads((out / "metrics.json").read_text())
    rounds, summary = content["rounds"], content["summary"]
    assert [r["aligned"] for r in rounds] == [None, "A"]
    for r in rounds:
        assert r["eval_exact_match"] in {i / 8 for i in range(9)}  # 8 held-out chats
        assert r["eval_perplexity"] > 1.0 and r["eval_accuracy"] is None
        assert r["train_loss"] > 0.0 and r["relative_aggregation_error"] is not None
    assert summary["final_exact_match"] == rounds[-1]["eval_exact_match"]
    assert summary["label_skew"] > 0.0  # divided by "kind"
    assert content["config"]["extractor"] == "exact" and content["config"]["max_new_tokens"] == 6
    assert (out / "curves.png").stat().st_size > 1000
    assert "fedrot: " in capsys.readouterr().out


def test_instruction_data_with_held_out_text_is_one_line_usage_error(tmp_path, capsys):
    chats = write_chats(tmp_path / "chats.jsonl", 12)
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "plain words"}) + "\n")
    status = main(["simulate", "--data", str(chats), "--eval-data", str(text),
                   "--out", str(tmp_path / "o"), *TINY_LLAMA_FLAGS])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err
    assert "holds text rows" in err and "chat rows" in err


def test_chat_rows_need_a_chat_template(tmp_path):
    from fedrot_client.errors import DataError
    from fedrot_client.simulation.engine import check_chat_template
    from fedrot_client.simulation.federated_data import file_federation
    from fedrot_client.tinyllama import build_tokenizer
    from fedrot_client.user_data import load_user_files

    chats = write_chats(tmp_path / "chats.jsonl", 12)
    data = file_federation(load_user_files([chats], classification=False), 2, alpha=1.0, seed=0,
                           eval_size=4, per_client=None)  # fmt: skip
    tokenizer = build_tokenizer()
    check_chat_template(data, tokenizer)  # the tiny Llama has one
    tokenizer.chat_template = None
    with pytest.raises(DataError, match=r"chats\.jsonl: chat data needs a chat template"):
        check_chat_template(data, tokenizer)
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    check_chat_template(data, tokenizer, template)  # --chat-template FILE's text
    assert tokenizer.chat_template == template


def test_an_unreadable_chat_template_is_one_line_usage_error(tmp_path, capsys):
    chats = write_chats(tmp_path / "chats.jsonl", 12)
    status = main(["simulate", "--data", str(chats), "--chat-template", str(tmp_path / "none.j2"),
                   "--out", str(tmp_path / "o"), *TINY_LLAMA_FLAGS])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and "--chat-template" in err and "cannot read" in err


def test_wordnet_task_that_the_task_cannot_train_is_one_line_usage_error(tmp_path, capsys):
    status = main(["simulate", "--wordnet-task", "reverse-dictionary", "--out",
                   str(tmp_path / "o"), *TINY_FLAGS])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and "--wordnet-task reverse-dictionary needs --task causal-lm" in err


@needs_wordnet
def test_wordnet_reverse_dictionary_is_chats_split_by_category():
    from fedrot_client.instructions import InstructionData
    from fedrot_client.simulation.federated_data import WordNetTask, wordnet_federation

    data = wordnet_federation(3, alpha=0.5, seed=0, eval_size=20, per_client=50,
                              task=WordNetTask.REVERSE_DICTIONARY)  # fmt: skip
    assert all(isinstance(c, InstructionData) and c.is_chat for c in data.clients)
    assert len(data.evaluation) == 20 and all(len(c) == 50 for c in data.clients)
    prompt, answer = data.evaluation.rows[0]["prompt"], data.evaluation.rows[0]["completion"]
    assert prompt[0]["role"] == "user" and "Which word is defined as" in prompt[0]["content"]
    assert answer[0]["role"] == "assistant" and answer[0]["content"].isalpha()
    assert data.skew > 0.2


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
