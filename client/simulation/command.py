"""``fedrot simulate``'s body: build the config and data from the parsed flags, run, write files.

Imported lazily by :mod:`fedrot.cli.simulate`, so the ``fedrot`` core never imports transformers.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from fedrot.cli.files import InputError
from fedrot_client.data import FieldNames
from fedrot_client.errors import DataError, ModelError
from fedrot_client.instructions import read_chat_template
from fedrot_client.lora import LoraSpec
from fedrot_client.models import ModelSpec, TaskKind
from fedrot_client.simulation.config import SimulationConfig
from fedrot_client.simulation.engine import RoundMetrics, SimulationResult, run_simulation
from fedrot_client.simulation.federated_data import (
    FederatedData,
    WordNetTask,
    file_federation,
    wordnet_federation,
)
from fedrot_client.simulation.records import CURVES_PNG, write_metrics
from fedrot_client.user_data import UserFiles, load_user_files

logger = logging.getLogger(__name__)


WORDNET_LABELS = 45


def config_from_args(args: argparse.Namespace, num_labels: int | None = None) -> SimulationConfig:
    """The run's :class:`SimulationConfig` from ``fedrot simulate``'s flags; ``num_labels`` is
    the data's label count (default: ``--num-labels``, else WordNet's 45)."""
    task = TaskKind(args.task)
    labels = num_labels or args.num_labels or WORDNET_LABELS
    model = ModelSpec(args.model, task=task, num_labels=labels, seed=args.seed)
    targets = tuple(args.target_modules.split(","))
    lora = LoraSpec(r=args.rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    target_modules=targets)  # fmt: skip
    return SimulationConfig(
        model=model, lora=lora, strategy=args.strategy, lam=args.lam,
        align_first=args.align_first, num_clients=args.clients,
        client_fraction=args.client_fraction, rounds=args.rounds,
        local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, max_length=args.max_length,
        eval_batch_size=args.eval_batch_size, eval_every=args.eval_every,
        max_new_tokens=args.max_new_tokens, extractor=args.extractor,
        chat_template=read_chat_template(args.chat_template), seed=args.seed,
        backend=args.backend, client_basis=args.client_basis,
        client_init=args.client_init,
        stale_fraction=args.stale_fraction,
        staleness_weight=args.staleness_weight, num_threads=args.threads,
        extra={"alpha": args.alpha, "per_client": args.per_client,
               "eval_size": None if args.eval_data is not None else args.eval_size,
               **_data_description(args)},
    )  # fmt: skip


def run_command(args: argparse.Namespace) -> int:
    """Run one simulation and write ``metrics.json``, ``metrics.csv`` and ``curves.png``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        files = _user_files(args)
        num_labels = _num_labels(args, files)
        config = config_from_args(args, num_labels)
        data = _federation(args, config, files)
    except ValueError as exc:  # DataError included: a bad row, no WordNet, an impossible split
        raise InputError(f"simulate: {exc}") from exc
    try:
        result = simulate_to(args.out, config, data, plot=not args.no_plot)
    except (DataError, ModelError) as exc:  # found once the model is loaded: no chat template
        raise InputError(f"simulate: {exc}") from exc
    print(_summary_line(result))
    return 0


def _user_files(args: argparse.Namespace) -> UserFiles | None:
    """``--data`` (and ``--eval-data``) read and checked, or None for WordNet."""
    if args.data is None:
        if args.eval_data is not None or args.labels is not None:
            raise ValueError("--eval-data and --labels go with --data (your own data)")
        return None
    if args.wordnet_task is not None:
        raise ValueError("--wordnet-task goes with WordNet, not with --data")
    paths = [args.data] + ([args.eval_data] if args.eval_data is not None else [])
    classification = TaskKind(args.task) is TaskKind.CLASSIFICATION
    fields = FieldNames(args.text_field, args.label_field)
    return load_user_files(paths, classification=classification, fields=fields,
                           labels_file=args.labels)  # fmt: skip


def _num_labels(args: argparse.Namespace, files: UserFiles | None) -> int | None:
    """The label count of ``--data`` (a given ``--num-labels`` must agree with it)."""
    if files is None or TaskKind(args.task) is not TaskKind.CLASSIFICATION:
        return None
    assert files.vocabulary is not None
    found = len(files.vocabulary)
    if args.num_labels is not None and args.num_labels != found:
        source = args.labels if args.labels is not None else args.data
        raise ValueError(f"--num-labels {args.num_labels} but {source} has {found} labels")
    if found < 2:
        raise ValueError(f"{args.data}: classification needs at least 2 labels, found {found}")
    return found


def _federation(args: argparse.Namespace, config: SimulationConfig,
                files: UserFiles | None) -> FederatedData:  # fmt: skip
    if files is not None:
        return file_federation(files, config.num_clients, alpha=args.alpha, seed=config.seed,
                               eval_size=args.eval_size, per_client=args.per_client)  # fmt: skip
    return wordnet_federation(
        config.num_clients, alpha=args.alpha, seed=config.seed, eval_size=args.eval_size,
        per_client=args.per_client, task=_wordnet_task(args), directory=args.wordnet_dir,
    )  # fmt: skip


def _wordnet_task(args: argparse.Namespace) -> WordNetTask:
    """``--wordnet-task``, by default the one ``--task`` trains on; one that ``--task`` cannot
    train is a ValueError."""
    task = TaskKind(args.task)
    if args.wordnet_task is None:
        return WordNetTask.CATEGORIES if task is TaskKind.CLASSIFICATION else WordNetTask.GLOSSES
    chosen = WordNetTask(args.wordnet_task)
    if (chosen is WordNetTask.CATEGORIES) != (task is TaskKind.CLASSIFICATION):
        raise ValueError(f"--wordnet-task {chosen} needs --task "
                         f"{'classification' if chosen is WordNetTask.CATEGORIES else 'causal-lm'}")
    return chosen


def _data_description(args: argparse.Namespace) -> dict[str, Any]:
    if args.data is None:
        return {"data": "wordnet", "wordnet_task": str(_wordnet_task(args))}
    return {"data": str(args.data), "eval_data": None if args.eval_data is None
            else str(args.eval_data), "text_field": args.text_field,
            "label_field": args.label_field,
            "labels": None if args.labels is None else str(args.labels)}  # fmt: skip


def simulate_to(out: Path, config: SimulationConfig, data, *, plot: bool = True,
                ray_init: dict[str, Any] | None = None) -> SimulationResult:  # fmt: skip
    """Run and write the files under ``out`` (after each round, then with the summary)."""
    out = Path(out)
    done: list[RoundMetrics] = []

    def record(metrics: RoundMetrics) -> None:
        done.append(metrics)
        write_metrics(out, config.to_dict(), done)

    result = run_simulation(config, data, on_round=record, ray_init=ray_init)
    write_metrics(out, config.to_dict(), result.rounds, result.summary())
    if plot:
        from fedrot_client.simulation.plots import plot_run

        title = f"{config.strategy} (N={config.num_clients}, seed {config.seed})"
        plot_run([r.to_dict() for r in result.rounds], out / CURVES_PNG, title=title)
    logger.info("wrote %s", out)
    return result


def _summary_line(result: SimulationResult) -> str:
    summary = result.summary()
    parts = [f"{key}={value:.4g}" for key, value in summary.items()
             if isinstance(value, float)]  # fmt: skip
    return f"{result.config.strategy}: " + " ".join(parts)
