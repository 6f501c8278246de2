"""A client's local data: JSONL, CSV or a saved Hugging Face dataset, turned into texts and ids.

Labels may be strings or integers. A :class:`LabelVocabulary`, fixed by the run's specification,
maps label names to ids so that every client numbers the classes alike. Causal-LM data has no
label field (``FieldNames(label=None)``).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fedrot_client.errors import DataError, UnknownLabelError

logger = logging.getLogger(__name__)

Row = tuple[str, Mapping[str, object]]  # (where: "file:line", fields)


@dataclass(frozen=True)
class LabelVocabulary:
    """Label names in id order: ``names[i]`` is the class with id ``i``."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if not self.names:
            raise ValueError("a label vocabulary needs at least one label")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate label names in vocabulary {list(self.names)}")

    @classmethod
    def of_size(cls, num_labels: int) -> LabelVocabulary:
        """Integer labels ``0 .. num_labels - 1``, named by their decimal form."""
        return cls(tuple(str(i) for i in range(num_labels)))

    def __len__(self) -> int:
        return len(self.names)

    def id_of(self, value: object) -> int:
        """The id of a label given as its name, its id (int), or its id in decimal (CSV)."""
        if isinstance(value, bool):
            raise ValueError(f"label {value!r} is a boolean, not a label name or id")
        if isinstance(value, int):
            return self._checked_id(value)
        if isinstance(value, str):
            index = self._index().get(value)
            if index is not None:
                return index
            if value.strip().lstrip("-").isdigit():
                return self._checked_id(int(value))
            raise UnknownLabelError(f"unknown label {value!r}; expected one of "
                                    f"{self._preview()}")  # fmt: skip
        raise ValueError(f"label {value!r} has type {type(value).__name__}, not str or int")

    def _checked_id(self, value: int) -> int:
        if not 0 <= value < len(self.names):
            raise UnknownLabelError(f"label id {value} is outside 0..{len(self.names) - 1}")
        return value

    def _index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def _preview(self) -> str:
        shown = ", ".join(self.names[:8])
        return f"[{shown}{', ...' if len(self.names) > 8 else ''}] ({len(self.names)} labels)"


@dataclass(frozen=True)
class FieldNames:
    """Which fields hold the text and the label; ``label=None`` for causal-LM data."""

    text: str = "text"
    label: str | None = "label"


@dataclass(frozen=True)
class TextDataset:
    """Texts and, for classification, their label ids (``labels[i]`` belongs to ``texts[i]``)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...] | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(int(x) for x in self.labels))
            if len(self.labels) != len(self.texts):
                raise DataError(
                    f"{self.source}: {len(self.texts)} texts but {len(self.labels)} labels"
                )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Iterable[int]) -> TextDataset:
        """The examples at ``indices``, in that order."""
        chosen = [int(i) for i in indices]
        labels = None if self.labels is None else tuple(self.labels[i] for i in chosen)
        return TextDataset(tuple(self.texts[i] for i in chosen), labels, self.source)


def load_dataset(
    path: str | Path,
    *,
    vocabulary: LabelVocabulary | None = None,
    fields: FieldNames = FieldNames(),
    split: str | None = None,
) -> TextDataset:
    """Read a ``.jsonl``, ``.csv`` / ``.tsv`` file or a saved Hugging Face dataset folder.

    ``vocabulary`` is required when ``fields.label`` is set. ``split`` picks a split of a saved
    ``DatasetDict`` (default ``"train"``). Raises :class:`DataError` naming the file, the line
    (or row) and the field of the first bad row.
    """
    path = Path(path)
    if fields.label is not None and vocabulary is None:
        raise ValueError(f"{path}: a label vocabulary is needed to read labels")
    rows = read_rows(path, split)
    dataset = rows_to_dataset(rows, fields=fields, vocabulary=vocabulary, source=str(path))
    logger.info("loaded %s examples from %s", len(dataset), path)
    return dataset


def rows_to_dataset(
    rows: Iterable[Row],
    *,
    fields: FieldNames,
    vocabulary: LabelVocabulary | None,
    source: str,
) -> TextDataset:
    """Convert ``(where, fields)`` rows; the first bad row raises :class:`DataError`."""
    texts: list[str] = []
    labels: list[int] = []
    for where, row in rows:
        texts.append(_text_of(where, row, fields.text))
        if fields.label is not None:
            assert vocabulary is not None
            labels.append(_label_of(where, row, fields.label, vocabulary))
    if not texts:
        raise DataError(f"{source}: no examples")
    return TextDataset(tuple(texts), tuple(labels) if fields.label else None, source)


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, object]]) -> int:
    """Write one JSON object a line (UTF-8); returns the number of lines written."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def _text_of(where: str, row: Mapping[str, object], field: str) -> str:
    if field not in row:
        raise DataError(f"{where}: missing text field {field!r} (fields: {sorted(row)})")
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
    return value


def _label_of(
    where: str, row: Mapping[str, object], field: str, vocabulary: LabelVocabulary
) -> int:
    if field not in row or row[field] is None or row[field] == "":
        raise DataError(f"{where}: missing label field {field!r}")
    try:
        return vocabulary.id_of(row[field])
    except UnknownLabelError as exc:
        raise UnknownLabelError(f"{where}: field {field!r}: {exc}") from exc
    except ValueError as exc:
        raise DataError(f"{where}: field {field!r}: {exc}") from exc


def _read_jsonl(path: Path, split: str | None) -> Iterator[Row]:
    with _utf8_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


@contextmanager
def _utf8_text(path: Path) -> Iterator[TextIO]:
    """``path`` opened as UTF-8 text (a byte-order mark, as spreadsheets write, is skipped);
    bytes that are not UTF-8 are a DataError naming the file."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        try:
            yield handle
        except UnicodeDecodeError as exc:
            bad = exc.object[exc.start : exc.start + 1].hex()
            raise DataError(f"{path}: not UTF-8 text (byte 0x{bad}: {exc.reason}); save it as "
                            "UTF-8") from None


def _read_csv(path: Path, split: str | None, delimiter: str = ",") -> Iterator[Row]:
    with _utf8_text(path) as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError(f"{where}: more values than the {len(reader.fieldnames or [])} "
                                "columns of the header")
            yield where, row


def _read_tsv(path: Path, split: str | None) -> Iterator[Row]:
    return _read_csv(path, split, delimiter="\t")


def _read_saved_hf(path: Path, split: str | None) -> Iterator[Row]:
    import datasets  # heavy; only for this format

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a saved Hugging Face dataset ({exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise DataError(f"{path}: no split {name!r} (splits: {sorted(loaded)})")
        loaded = loaded[name]
    class_names = _class_label_names(loaded.features)
    for number, row in enumerate(loaded):
        yield f"{path}[row {number}]", _named_class_labels(row, class_names)


def _class_label_names(features: Mapping[str, object]) -> dict[str, Sequence[str]]:
    import datasets

    return {
        name: feature.names
        for name, feature in features.items()
        if isinstance(feature, datasets.ClassLabel)
    }


def _named_class_labels(
    row: Mapping[str, object], class_names: Mapping[str, Sequence[str]]
) -> Mapping[str, object]:
    """Replace ``ClassLabel`` ids by their names, so the run's vocabulary decides the ids."""
    if not class_names:
        return row
    out = dict(row)
    for field, names in class_names.items():
        value = out.get(field)
        if isinstance(value, int) and 0 <= value < len(names):
            out[field] = names[value]
    return out


_READERS: Mapping[str, Callable[[Path, str | None], Iterator[Row]]] = {
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".tsv": _read_tsv,
}


def read_rows(path: Path, split: str | None) -> Iterator[Row]:
    """The rows of a JSONL, CSV/TSV file or saved Hugging Face dataset, with where each is."""
    if path.is_dir():
        return _read_saved_hf(path, split)
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unknown data format {path.suffix!r}; expected one of "
            f"{sorted(_READERS)} or a saved Hugging Face dataset folder"
        )
    return reader(path, split)
