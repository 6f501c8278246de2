"""Reading user data: JSONL, CSV, saved Hugging Face datasets, label vocabularies, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrot_client.data import FieldNames, LabelVocabulary, TextDataset, load_dataset
from fedrot_client.errors import DataError

VOCAB = LabelVocabulary(("negative", "positive"))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_with_string_and_int_labels(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"text": "so good", "label": "positive"}),
        "",
        json.dumps({"text": "so bad", "label": 0}),
    ])  # fmt: skip
    data = load_dataset(path, vocabulary=VOCAB)
    assert data.texts == ("so good", "so bad")
    assert data.labels == (1, 0)
    assert len(data) == 2


def test_jsonl_custom_field_names(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"sentence": "x y", "y": "negative"})])
    data = load_dataset(path, vocabulary=VOCAB, fields=FieldNames(text="sentence", label="y"))
    assert data.texts == ("x y",) and data.labels == (0,)


def test_csv_labels_by_name_and_by_decimal_id(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.csv", ["text,label", '"hello, world",positive', "meh,0"])
    data = load_dataset(path, vocabulary=VOCAB)
    assert data.texts == ("hello, world", "meh")
    assert data.labels == (1, 0)


def test_causal_lm_data_needs_no_labels(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "cat: a small feline"})])
    data = load_dataset(path, fields=FieldNames(label=None))
    assert data.labels is None and data.texts == ("cat: a small feline",)


def test_saved_hugging_face_dataset_with_class_label(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "sentence": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["positive", "negative"]),  # other order than VOCAB
    })  # fmt: skip
    ds = datasets.Dataset.from_dict(
        {"sentence": ["nice", "awful"], "label": [0, 1]}, features=features
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    data = load_dataset(
        tmp_path / "hf", vocabulary=VOCAB, fields=FieldNames(text="sentence")
    )
    assert data.texts == ("nice", "awful")
    assert data.labels == (1, 0)  # mapped by name to the run's vocabulary


def test_saved_hugging_face_dataset_missing_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a"], "label": [0]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match="no split 'test'"):
        load_dataset(tmp_path / "hf", vocabulary=VOCAB, split="test")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "ok", "label": "neutral"}', r"d\.jsonl:2: field 'label': unknown label"),
        ('{"text": "ok", "label": 7}', r"d\.jsonl:2: field 'label': label id 7 is outside 0\.\.1"),
        ('{"text": "", "label": 0}', r"d\.jsonl:2: field 'text' must be a non-empty string"),
        ('{"label": 0}', r"d\.jsonl:2: missing text field 'text'"),
        ('{"text": "ok"}', r"d\.jsonl:2: missing label field 'label'"),
        ('{"text": "ok", "label": true}', r"d\.jsonl:2: field 'label': .*boolean"),
        ("[1, 2]", r"d\.jsonl:2: expected a JSON object"),
        ('{"text": "ok", ', r"d\.jsonl:2: not valid JSON"),
    ],
)
def test_bad_jsonl_row_names_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "fine", "label": 1}', line])
    with pytest.raises(DataError, match=message):
        load_dataset(path, vocabulary=VOCAB)


def test_bad_csv_row_names_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.csv", ["text,label", "fine,1", "too,many,values"])
    with pytest.raises(DataError, match=r"d\.csv:3: more values"):
        load_dataset(path, vocabulary=VOCAB)


def test_unknown_format_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data format '.parquet'"):
        load_dataset(write_lines(tmp_path / "d.parquet", ["x"]), vocabulary=VOCAB)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "absent.jsonl", vocabulary=VOCAB)
    with pytest.raises(DataError, match="no examples"):
        load_dataset(write_lines(tmp_path / "e.jsonl", [""]), vocabulary=VOCAB)


def test_labels_need_a_vocabulary(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        load_dataset(write_lines(tmp_path / "d.jsonl", ['{"text": "a", "label": 0}']))


def test_vocabulary_rules() -> None:
    numeric = LabelVocabulary.of_size(3)
    assert [numeric.id_of(v) for v in (0, "1", 2)] == [0, 1, 2]
    with pytest.raises(ValueError, match="duplicate"):
        LabelVocabulary(("a", "a"))
    with pytest.raises(ValueError, match="type float"):
        numeric.id_of(1.0)


def test_subset_keeps_pairs() -> None:
    data = TextDataset(("a", "b", "c"), (0, 1, 0))
    part = data.subset([2, 0])
    assert part.texts == ("c", "a") and part.labels == (0, 0)
    with pytest.raises(DataError, match="3 texts but 2 labels"):
        TextDataset(("a", "b", "c"), (0, 1))


def test_a_spreadsheet_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("text,label\r\ncaf\u00e9 ok,positive\r\n".encode("utf-8-sig"))
    data = load_dataset(path, vocabulary=VOCAB)
    assert data.texts == ("caf\u00e9 ok",) and data.labels == (1,)


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.csv"])
def test_a_file_that_is_not_utf8_is_a_data_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    row = json.dumps({"text": "caf\u00e9", "label": 1}, ensure_ascii=False)
    text = row if name.endswith(".jsonl") else "text,label\ncaf\u00e9,1"
    path.write_bytes((text + "\n").encode("latin-1"))
    with pytest.raises(DataError, match=f"{name}: not UTF-8 text"):
        load_dataset(path, vocabulary=VOCAB)
