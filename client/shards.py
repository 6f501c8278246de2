"""One dataset split into client shards on disk: ``client-<i>.jsonl``, ``eval.jsonl``,
``labels.json`` and ``manifest.json``.

The split is :func:`fedrot_client.partition.split_federated`: a seeded held-out set first, then a
label-Dirichlet(``alpha``) split of the rest, each shard capped at ``max_per_client`` by a seeded
sample (its label mix kept). Each file's lines are in a seeded shuffled order. WordNet
(:mod:`fedrot_client.wordnet`) and users' files (``fedrot split``, :func:`split_user_data`) both
write through :func:`write_split`, so the demo, compose and a user's federation split alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedrot_client.data import FieldNames, write_jsonl
from fedrot_client.partition import label_histograms, label_skew, split_federated
from fedrot_client.user_data import load_user_files

EVAL_FILE = "eval.jsonl"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "manifest.json"
DEFAULT_EVAL_SIZE = 1000
DEFAULT_EVAL_FRACTION = 0.1


def client_file(index: int) -> str:
    return f"client-{index}.jsonl"


@dataclass(frozen=True)
class SplitOptions:
    """How a dataset is divided: ``eval_size`` rows held out (0: none; None: a tenth of the rows,
    at most 1000), the rest split across ``num_clients`` by a label-Dirichlet(``alpha``) draw,
    then capped at ``max_per_client``."""

    num_clients: int = 3
    alpha: float = 0.5
    seed: int = 0
    eval_size: int | None = None
    max_per_client: int | None = None

    def for_rows(self, num_rows: int) -> SplitOptions:
        """These options with ``eval_size`` resolved for a dataset of ``num_rows``."""
        if self.eval_size is not None:
            return self
        size = min(DEFAULT_EVAL_SIZE, int(num_rows * DEFAULT_EVAL_FRACTION))
        return replace(self, eval_size=size)


def write_split(
    records: Sequence[Mapping[str, object]],
    groups: NDArray[np.int64],
    out_dir: str | Path,
    options: SplitOptions,
    *,
    num_groups: int,
    label_names: Sequence[str] | None = None,
    describe: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """Split ``records`` by ``groups`` (``(len(records),)`` class ids in ``0 .. num_groups - 1``)
    and write the files under ``out_dir``: the shards, ``eval.jsonl`` when ``eval_size > 0``,
    ``labels.json`` when ``label_names`` are given, and ``manifest.json`` (``describe``'s keys,
    then per-file counts, the label skew and the per-client label counts), which it returns."""
    options = options.for_rows(len(records))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = split_federated(
        groups, options.num_clients, alpha=options.alpha, seed=options.seed,
        eval_size=options.eval_size, max_per_client=options.max_per_client,
    )  # fmt: skip
    files = {client_file(i): shard for i, shard in enumerate(split.clients)}
    if options.eval_size > 0:
        files[EVAL_FILE] = split.evaluation
    rng = np.random.default_rng([options.seed, 2])
    for name, indices in files.items():
        # A seeded shuffled order: a file's first lines are not all of one class or source.
        write_jsonl(out / name, (records[i] for i in rng.permutation(indices)))
    if label_names is not None:
        (out / LABELS_FILE).write_text(json.dumps(list(label_names), indent=1,
                                                  ensure_ascii=False) + "\n")  # fmt: skip
    manifest = {
        **(describe or {}),
        "counts": {name: int(len(indices)) for name, indices in files.items()},
        "label_skew": label_skew(groups, split.clients, num_groups),
        "client_label_counts": label_histograms(groups, split.clients, num_groups).tolist(),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def split_user_data(
    path: str | Path,
    out_dir: str | Path,
    options: SplitOptions,
    *,
    classification: bool = True,
    fields: FieldNames = FieldNames(),
    labels_file: str | Path | None = None,
) -> dict[str, object]:
    """``fedrot split``'s data step: read and check ``path`` (every row, as a client would), then
    :func:`write_split` its rows unchanged. ``labels.json`` is written for classification and
    for causal-LM data divided by a label field. The manifest adds the source, the task, the
    fields, the label count and the options."""
    data = load_user_files([path], classification=classification, fields=fields,
                           labels_file=labels_file)  # fmt: skip
    (rows,) = data.files
    options = options.for_rows(len(rows))
    names = None if data.vocabulary is None else data.vocabulary.names
    describe = {
        "source": str(path),
        "task": "classification" if classification else "causal-lm",
        "shape": rows.shape,
        "fields": {"text": fields.text, "label": fields.label if names else None},
        "num_labels": len(names) if names else None,
        "options": asdict(options),
    }
    return write_split(rows.records, rows.groups, out_dir, options, num_groups=data.num_groups,
                       label_names=names, describe=describe)  # fmt: skip
