"""A user's file split into client shards (``fedrot split``'s data step): rows checked as the
daemon checks them, written back unchanged, held-out rows drawn before the split, labels.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedrot_client.data import FieldNames, LabelVocabulary, load_dataset
from fedrot_client.errors import DataError
from fedrot_client.shards import SplitOptions, split_user_data
from fedrot_client.user_data import infer_vocabulary, load_user_files, read_label_file

CLASSES = ("sports", "cooking", "weather", "music")


def reviews(n: int = 200) -> list[dict[str, object]]:
    return [{"id": i, "body": f"note {i} about {CLASSES[i % 4]}", "topic": CLASSES[i % 4]}
            for i in range(n)]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


FIELDS = FieldNames(text="body", label="topic")


def test_shards_hold_every_row_once_unchanged_with_a_held_out_split(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "reviews.jsonl", reviews())
    options = SplitOptions(num_clients=3, alpha=0.3, seed=5, eval_size=40)
    manifest = split_user_data(source, tmp_path / "out", options, fields=FIELDS)
    out = tmp_path / "out"
    shards = [read_jsonl(out / f"client-{i}.jsonl") for i in range(3)]
    held_out = read_jsonl(out / "eval.jsonl")
    assert len(held_out) == 40 and all(len(shard) > 0 for shard in shards)
    every = [row for part in (*shards, held_out) for row in part]
    assert sorted(every, key=lambda row: row["id"]) == reviews()  # all fields kept, none twice
    assert json.loads((out / "labels.json").read_text()) == sorted(CLASSES)
    assert manifest["counts"] == {**{f"client-{i}.jsonl": len(s) for i, s in enumerate(shards)},
                                  "eval.jsonl": 40}  # fmt: skip
    assert manifest["num_labels"] == 4 and manifest["fields"] == {"text": "body", "label": "topic"}
    histogram = np.array(manifest["client_label_counts"])
    assert histogram.sum() == 160 and manifest["label_skew"] > 0.1
    # A client reads its shard with the written labels.json and the same fields.
    vocabulary = read_label_file(out / "labels.json")
    shard = load_dataset(out / "client-0.jsonl", vocabulary=vocabulary, fields=FIELDS)
    assert np.bincount(shard.labels, minlength=4).tolist() == histogram[0].tolist()


def test_the_split_is_seeded_and_capped(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "reviews.jsonl", reviews())
    options = SplitOptions(num_clients=2, alpha=1.0, seed=1, eval_size=20, max_per_client=30)
    first = split_user_data(source, tmp_path / "a", options, fields=FIELDS)
    split_user_data(source, tmp_path / "b", options, fields=FIELDS)
    split_user_data(source, tmp_path / "c", SplitOptions(2, 1.0, 2, 20, 30), fields=FIELDS)
    assert all(first["counts"][f"client-{i}.jsonl"] == 30 for i in range(2))
    for name in ("client-0.jsonl", "client-1.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other_seed = (tmp_path / "c" / "eval.jsonl").read_bytes()
    assert (tmp_path / "a" / "eval.jsonl").read_bytes() != other_seed


def test_default_held_out_is_a_tenth_and_zero_writes_none(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "reviews.jsonl", reviews())
    manifest = split_user_data(source, tmp_path / "a", SplitOptions(2, 0.5), fields=FIELDS)
    assert manifest["counts"]["eval.jsonl"] == 20 and manifest["options"]["eval_size"] == 20
    none = split_user_data(source, tmp_path / "b", SplitOptions(2, 0.5, eval_size=0), fields=FIELDS)
    assert "eval.jsonl" not in none["counts"] and not (tmp_path / "b" / "eval.jsonl").exists()


def test_csv_with_integer_labels_and_a_labels_file(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([f"row {i}", i % 3] for i in range(30))
    data = load_user_files([path], classification=True)
    assert data.vocabulary == LabelVocabulary.of_size(3)  # ids kept, not renumbered
    assert data.files[0].groups.tolist() == [i % 3 for i in range(30)]
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["zero", "one", "two", "three"]))
    named = load_user_files([path], classification=True, labels_file=labels)
    assert len(named.vocabulary) == 4 and named.files[0].groups.tolist()[:4] == [0, 1, 2, 0]


def test_vocabulary_is_read_off_the_labels() -> None:
    rows = [("f:1", {"label": "b"}), ("f:2", {"label": "a"}), ("f:3", {"label": "b"}),
            ("f:4", {"other": 1})]  # fmt: skip
    assert infer_vocabulary(rows, "label").names == ("a", "b")
    assert infer_vocabulary([("f:1", {"y": 2}), ("f:2", {"y": "0"})], "y").names == ("0", "1", "2")
    with pytest.raises(DataError, match="no labels"):
        infer_vocabulary(rows, "y")


@pytest.mark.parametrize(("line", "named"), [
    ('{"body": "", "topic": "sports"}', "reviews.jsonl:3: field 'body' must be a non-empty"),
    ('{"body": "ok"}', "reviews.jsonl:3: missing label field 'topic'"),
    ('{"body": "ok", "topic": "chess"}', "reviews.jsonl:3: field 'topic': unknown label 'chess'"),
    ("not json", "reviews.jsonl:3: not valid JSON"),
])  # fmt: skip
def test_a_bad_row_names_file_line_and_field(tmp_path: Path, line: str, named: str) -> None:
    path = write_jsonl(tmp_path / "reviews.jsonl", reviews(2))
    path.write_text(path.read_text() + line + "\n")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(list(CLASSES)))
    with pytest.raises(DataError, match=named):
        split_user_data(path, tmp_path / "out", SplitOptions(2, 0.5, eval_size=0),
                        fields=FIELDS, labels_file=labels)  # fmt: skip
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_missing_label_field_names_the_fields_found(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "reviews.jsonl", reviews(4))
    with pytest.raises(DataError, match=r"reviews.jsonl:1: no label field 'label' \(fields: "):
        load_user_files([path], classification=True, fields=FieldNames("body"))


def test_chat_rows_for_a_causal_lm_split_by_their_label(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}],
             "topic": CLASSES[i % 2]} for i in range(60)]  # fmt: skip
    source = write_jsonl(tmp_path / "chats.jsonl", rows)
    manifest = split_user_data(source, tmp_path / "out", SplitOptions(2, 0.2, eval_size=10),
                               classification=False, fields=FIELDS)  # fmt: skip
    assert manifest["shape"] == "chat" and manifest["num_labels"] == 2
    written = [r for i in range(2) for r in read_jsonl(tmp_path / "out" / f"client-{i}.jsonl")]
    assert len(written) == 50 and all("messages" in r for r in written)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*rows[:2], {"messages": [rows[0]["messages"][0]]}])
    with pytest.raises(DataError, match="bad.jsonl:3: 'messages' must be a list of at least two"):
        load_user_files([bad], classification=False, fields=FIELDS)


def test_plain_text_without_labels_is_split_by_size(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(50)])
    data = load_user_files([source], classification=False)
    assert data.vocabulary is None and data.files[0].shape == "text"
    assert data.files[0].dataset.labels is None and set(data.files[0].groups.tolist()) == {0}
    manifest = split_user_data(source, tmp_path / "out", SplitOptions(3, 1.0, eval_size=5),
                               classification=False)  # fmt: skip
    assert sum(manifest["counts"].values()) == 50 and manifest["num_labels"] is None
    assert not (tmp_path / "out" / "labels.json").exists()
