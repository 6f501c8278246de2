"""A user's own dataset for ``fedrot simulate --data`` and ``fedrot split``: its rows, checked, its
label vocabulary, and the class of every row that the label-Dirichlet split divides by.

Files are read by :func:`fedrot_client.data.read_rows` (JSONL, CSV/TSV, a saved Hugging Face
dataset) and every row is checked by the client daemon's own rules
(:func:`fedrot_client.data.rows_to_dataset`; instruction rows by
:func:`fedrot_client.instructions.trl_row`), so a file that passes here is one a
``fedrot-client`` trains on. The first bad row raises :class:`~fedrot_client.errors.DataError`
naming the file, the line and the field.

The label vocabulary is ``labels.json`` when one is given (a JSON list of names in id order),
else it is read off the data: integer labels (or their decimal strings) ``0 .. max`` keep their
ids; any other labels are numbered in sorted order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from fedrot_client.data import FieldNames, LabelVocabulary, Row, TextDataset, read_rows
from fedrot_client.data import rows_to_dataset
from fedrot_client.errors import DataError

if TYPE_CHECKING:
    from fedrot_client.instructions import InstructionData

INSTRUCTION_SHAPES = ("prompt-completion", "chat", "alpaca")


@dataclass(frozen=True)
class UserData:
    """One file's rows, checked.

    ``records``: the rows as read (JSON-able dicts; ``fedrot split`` writes them back unchanged).
    ``groups``: ``(len(records),)`` int64, each row's class for the split (its label id; all 0
    for causal-LM rows without a label). ``dataset``: texts and, for classification, label ids
    (None for instruction rows); ``instructions``: instruction rows in TRL's shapes (None
    otherwise). ``shape``: ``"classification"``,
    ``"text"`` (plain causal-LM text) or an instruction shape (``"chat"``, ...).
    """

    source: str
    records: tuple[dict[str, object], ...]
    groups: NDArray[np.int64]
    dataset: TextDataset | None
    shape: str
    instructions: InstructionData | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def is_instruction_data(self) -> bool:
        return self.shape in INSTRUCTION_SHAPES


@dataclass(frozen=True)
class UserFiles:
    """Files read with one vocabulary: ``files[0]`` the training data, then any held-out file;
    ``vocabulary`` is None for causal-LM data without labels."""

    files: tuple[UserData, ...]
    vocabulary: LabelVocabulary | None

    @property
    def num_groups(self) -> int:
        return 1 if self.vocabulary is None else len(self.vocabulary)


def load_user_files(
    paths: Sequence[str | Path],
    *,
    classification: bool,
    fields: FieldNames = FieldNames(),
    labels_file: str | Path | None = None,
) -> UserFiles:
    """Read and check ``paths`` with one label vocabulary (``labels_file``, else the labels of
    all of them). Causal-LM data is divided by its label field when its first row has one."""
    if not paths:
        raise ValueError("no data files given")
    if classification and fields.label is None:
        raise ValueError("classification data needs a label field")
    rows = [_read_all(Path(p)) for p in paths]
    # Causal LM: only the training file's labels matter (they divide it), if it has any.
    labelled = rows if classification else rows[:1]
    label = fields.label if classification or fields.label in rows[0][0][1] else None
    vocabulary = None
    if label is not None and labels_file is not None:
        vocabulary = read_label_file(labels_file)
    elif label is not None:
        vocabulary = _vocabulary_of(labelled, label)
    files = tuple(
        _checked(str(path), file_rows, classification,
                 FieldNames(fields.text, label if index < len(labelled) else None), vocabulary)
        for index, (path, file_rows) in enumerate(zip(paths, rows, strict=True))
    )  # fmt: skip
    return UserFiles(files, vocabulary)


def read_label_file(path: str | Path) -> LabelVocabulary:
    """``labels.json``: a JSON list of distinct label names in id order."""
    path = Path(path)
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(names, list) or not all(isinstance(n, str | int) for n in names):
        raise DataError(f"{path}: expected a JSON list of label names")
    try:
        return LabelVocabulary(tuple(str(n) for n in names))
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None


def infer_vocabulary(rows: Iterable[Row], field: str) -> LabelVocabulary:
    """The labels found in ``field``: ids ``0 .. max`` when every label is a non-negative
    integer (or its decimal string), else the distinct names in sorted order. Rows without the
    field are left to the row check, which names them."""
    values = {value for _, row in rows
              if isinstance(value := row.get(field), str | int) and not isinstance(value, bool)
              and value != ""}  # fmt: skip
    if not values:
        raise DataError(f"no labels found in field {field!r}")
    if all(isinstance(v, int) or v.strip().isdigit() for v in values):
        return LabelVocabulary.of_size(max(int(v) for v in values) + 1)
    return LabelVocabulary(tuple(sorted({str(v) for v in values})))


def _vocabulary_of(files: Sequence[list[Row]], field: str) -> LabelVocabulary:
    try:
        return infer_vocabulary((row for rows in files for row in rows), field)
    except DataError:
        where, first = files[0][0]
        if field not in first:
            raise DataError(f"{where}: no label field {field!r} (fields: {sorted(first)})"
                            ) from None  # fmt: skip
        raise DataError(f"{where}: field {field!r} holds no label (a string or an integer)"
                        ) from None  # fmt: skip


def _read_all(path: Path) -> list[Row]:
    try:
        rows = list(read_rows(path, None))
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def _checked(
    source: str, rows: list[Row], classification: bool, fields: FieldNames,
    vocabulary: LabelVocabulary | None,
) -> UserData:  # fmt: skip
    records = tuple(_jsonable(where, row) for where, row in rows)
    shape = "classification" if classification else _causal_shape(rows)
    dataset = instructions = None
    if shape in INSTRUCTION_SHAPES:
        from fedrot_client.instructions import instruction_data  # transformers: only here

        instructions = instruction_data(rows, source)  # every row checked and converted
        groups = [0] * len(rows)
        if fields.label is not None and vocabulary is not None:
            groups = [_label_id(where, row, fields.label, vocabulary) for where, row in rows]
    else:
        dataset = rows_to_dataset(rows, fields=fields, vocabulary=vocabulary, source=source)
        groups = list(dataset.labels) if dataset.labels is not None else [0] * len(rows)
        if not classification:  # plain text: the labels only divide the data
            dataset = TextDataset(dataset.texts, None, source)
    return UserData(source, records, np.asarray(groups, dtype=np.int64), dataset, shape,
                    instructions)  # fmt: skip


def _causal_shape(rows: list[Row]) -> str:
    """The daemon's rule: the first row decides between instruction rows and plain text."""
    from fedrot_client.instructions import shape_of  # transformers: only here

    where, first = rows[0]
    try:
        return str(shape_of(where, first))
    except DataError:
        return "text"  # no instruction shape: plain text, checked by its text field


def _label_id(where: str, row: dict[str, object], field: str, vocabulary: LabelVocabulary) -> int:
    if row.get(field) in (None, ""):
        raise DataError(f"{where}: missing label field {field!r}")
    try:
        return vocabulary.id_of(row[field])
    except ValueError as exc:
        raise DataError(f"{where}: field {field!r}: {exc}") from None


def _jsonable(where: str, row: object) -> dict[str, object]:
    record = dict(row)  # type: ignore[call-overload]
    try:
        json.dumps(record, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: a field JSON cannot hold ({exc}); drop that column") from None
    return record
