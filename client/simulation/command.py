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
from fedrot_client.lora import LoraSpec
from fedrot_client.models import ModelSpec, TaskKind
from fedrot_client.simulation.config import SimulationConfig
from fedrot_client.simulation.engine import RoundMetrics, SimulationResult, run_simulation
from fedrot_client.simulation.federated_data import wordnet_federation
from fedrot_client.simulation.records import CURVES_PNG, write_metrics

logger = logging.getLogger(__name__)


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """The run's :class:`SimulationConfig` from ``fedrot simulate``'s flags."""
    task = TaskKind(args.task)
    model = ModelSpec(args.model, task=task, num_labels=args.num_labels, seed=args.seed)
    targets = tuple(args.target_modules.split(","))
    lora = LoraSpec(r=args.rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    target_modules=targets)  # fmt: skip
    return SimulationConfig(
        model=model, lora=lora, strategy=args.strategy, lam=args.lam,
        align_first=args.align_first, num_clients=args.clients,
        client_fraction=args.client_fraction, rounds=args.rounds,
        local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, max_length=args.max_length,
        eval_batch_size=args.eval_batch_size, eval_every=args.eval_every, seed=args.seed,
        backend=args.backend, client_basis=args.client_basis, num_threads=args.threads,
        extra={"alpha": args.alpha, "per_client": args.per_client, "eval_size": args.eval_size},
    )  # fmt: skip


def run_command(args: argparse.Namespace) -> int:
    """Run one simulation and write ``metrics.json``, ``metrics.csv`` and ``curves.png``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise InputError(f"simulate: {exc}") from exc
    try:
        data = wordnet_federation(
            config.num_clients, alpha=args.alpha, seed=config.seed, eval_size=args.eval_size,
            per_client=args.per_client, generative=config.task is TaskKind.CAUSAL_LM,
            directory=args.wordnet_dir,
        )  # fmt: skip
    except ValueError as exc:  # DataError included: no WordNet, a split it cannot make
        raise InputError(f"simulate: {exc}") from exc
    result = simulate_to(args.out, config, data, plot=not args.no_plot)
    print(_summary_line(result))
    return 0


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
