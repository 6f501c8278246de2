"""The daemon's training data for one run, checked against the run: its task and label names.

The run says what it trains (classification or a causal LM) and, for classification, may name
its classes in id order (``RunInfo.label_names``). The client's data names its classes with the
``labels`` setting (a JSON list in id order) or with the label values in its rows. Data that
does not fit the run raises :class:`~fedrot_client.errors.DataMismatchError` with one line
naming the first difference, which the daemon declines the run with:

- instruction rows (prompt/completion, chat, Alpaca) for a classification run, or a ``labels``
  list (classification data) for a causal-LM run (plain text with a label column is text to a
  causal LM, as ever);
- ``labels`` that differ from the run's names in number, names or order;
- a label value (or id) in the rows that the run's names do not hold.

A run that names no classes keeps the older check: ``labels`` must list ``num_labels`` names
(a :class:`~fedrot_client.settings.SettingsError` otherwise), and the rows' labels are read
with them or as ids.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedrot_client.data import LabelVocabulary, TextDataset, load_dataset
from fedrot_client.errors import DataMismatchError, UnknownLabelError
from fedrot_client.instructions import InstructionData, is_instruction_data, load_instructions
from fedrot_client.models import TaskKind
from fedrot_client.run_info import RunInfo
from fedrot_client.settings import ClientSettings


def label_difference(here: Sequence[str], run: Sequence[str]) -> str | None:
    """Where the label names ``here`` first differ from the ``run``'s, as text ("at id 3:
    'noun.act' here, 'verb.act' in the run"), or None when they are the same list."""
    for index, (mine, theirs) in enumerate(zip(here, run)):
        if mine != theirs:
            moved = f" (the run has {mine!r} at id {list(run).index(mine)})" if mine in run else ""
            return f"at id {index}: {mine!r} here, {theirs!r} in the run{moved}"
    if len(here) == len(run):
        return None
    index = min(len(here), len(run))
    first = (f"{here[index]!r} here, none in the run" if len(here) > len(run)
             else f"none here, {run[index]!r} in the run")  # fmt: skip
    return f"at id {index}: {first} ({len(here)} labels here, {len(run)} in the run)"


def load_run_data(settings: ClientSettings, run: RunInfo) -> InstructionData | TextDataset:
    """The client's data for ``run``: instruction rows for TRL (causal-LM instruction data),
    else texts with label ids in the run's numbering. Raises :class:`DataMismatchError` when
    the data does not fit the run, :class:`~fedrot_client.errors.DataError` for a bad row."""
    instructions = is_instruction_data(settings.data, settings.data_split)
    check_task(settings, run, instructions=instructions)
    if instructions:
        return load_instructions(settings.data, split=settings.data_split)
    classification = run.task is TaskKind.CLASSIFICATION
    vocabulary = run_vocabulary(settings, run) if classification else None
    fields = settings.field_names(classification)
    try:
        return load_dataset(settings.data, vocabulary=vocabulary, fields=fields,
                            split=settings.data_split)  # fmt: skip
    except UnknownLabelError as exc:
        if not run.label_names:
            raise
        raise DataMismatchError(f"data labels do not fit run {run.run_id}'s label names: "
                                f"{exc}") from exc  # fmt: skip


def check_task(settings: ClientSettings, run: RunInfo, *, instructions: bool) -> None:
    """:class:`DataMismatchError` when the data is for another task than the run's."""
    if run.task is TaskKind.CLASSIFICATION and instructions:
        raise DataMismatchError(
            f"run {run.run_id} is a classification run, but {settings.data} holds causal-LM "
            "instruction rows (prompt/completion, chat or Alpaca)"
        )
    if run.task is TaskKind.CAUSAL_LM and settings.labels is not None:
        raise DataMismatchError(
            f"run {run.run_id} is a causal-LM run, but this client's data is classification "
            f"data (labels {settings.labels})"
        )


def run_vocabulary(settings: ClientSettings, run: RunInfo) -> LabelVocabulary:
    """The label names to read the rows with: the run's (``labels``, when given, must be the
    same list), or for a run that names none, ``labels`` or ids."""
    if not run.label_names:
        return settings.label_vocabulary(run.model.num_labels)
    given = settings.given_labels()
    if given is not None:
        difference = label_difference(given.names, run.label_names)
        if difference is not None:
            raise DataMismatchError(f"data labels ({settings.labels}) differ from run "
                                    f"{run.run_id}'s {difference}")  # fmt: skip
    return LabelVocabulary(run.label_names)
