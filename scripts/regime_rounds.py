"""Two-round federations of several strategies that share their clients' training.

In a two-round run FedIT and FedRot-LoRA (any lambda) train the same updates: round 0 is
never aligned (ALGORITHM.md §2), so every strategy publishes the same round-0 aggregate, and the
clients of round 1 start from it with the same seeds. Only round 1's aggregation differs. So
this trains each round once and aggregates round 1's uploads with every strategy, through the
simulator's own steps (:mod:`fedrot_client.simulation.engine`: the jobs, the clients' starts,
the reported updates, the server's streaming aggregator, the round metrics) and writes each
strategy's ``metrics.json`` exactly as ``fedrot simulate`` would for that run.
``round0_steps`` lets round 0 train fewer local steps than round 1 (the round measured), so a
long-local-training setting costs one long round, not two.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from torch import Tensor


def _train_round(config, strategy, data, backend, round_index: int, broadcast, previous):
    """One round's uploads from ``broadcast`` (``previous``: the round before's broadcast)."""
    from fedrot.adapters import Adapter
    from fedrot_client.simulation import engine
    from fedrot_client.simulation.client_starts import train_from_starts

    plan = strategy.plan(round_index)
    jobs = engine._jobs(config, data, round_index)
    starts = engine._starts(config, strategy, plan, broadcast, previous)
    results = train_from_starts(backend, starts, plan.trained, jobs)
    reference = Adapter.from_state_dict(broadcast)
    return jobs, starts, results, reference


def _aggregate_and_measure(
    config, strategy, data, model, tokenizer, round_index: int, trained, seconds: float
) -> tuple[object, dict[str, Tensor]]:
    """``strategy``'s aggregate of ``trained``'s uploads, loaded in ``model``, and the round's
    metrics (evaluated when ``config`` evaluates that round)."""
    from fedrot_client.lora import load_adapter
    from fedrot_client.simulation import engine

    jobs, starts, results, reference = trained
    started = time.perf_counter()
    plan = strategy.plan(round_index)
    updates = engine._reported_updates(config, reference, plan, jobs, results, starts)
    report, adapter = engine._aggregate(strategy, reference, plan, updates)
    load_adapter(model, adapter)
    metrics = engine._round_metrics(config, plan, results, report, model, tokenizer, data,
                                    seconds + time.perf_counter() - started)  # fmt: skip
    return metrics, adapter


def run_two_rounds(
    configs: Mapping[str, object], data, folders: Mapping[str, Path], *, round0_steps: int
) -> None:
    """Each ``configs[key]`` (one :class:`SimulationConfig` per strategy, all else equal,
    ``rounds == 2``) written under ``folders[key]``; round 0 trains ``round0_steps`` local
    steps, round 1 the configs' ``local_steps``."""
    from fedrot.strategies import build_strategy
    from fedrot_client.lora import attach_lora, export_adapter
    from fedrot_client.models import load_base_model
    from fedrot_client.simulation.backends import InProcessBackend
    from fedrot_client.simulation.engine import SimulationResult
    from fedrot_client.simulation.records import write_metrics

    keys = list(configs)
    first = configs[keys[0]]
    assert all(c.rounds == 2 for c in configs.values()), "two-round runs only"
    base = load_base_model(first.model)
    model = attach_lora(base, first.lora, first.seed)
    backend = InProcessBackend(model, base.tokenizer)
    strategies = {k: build_strategy(c.strategy, c.strategy_config()) for k, c in configs.items()}
    initial = export_adapter(model)
    warmup = replace(first, local_steps=round0_steps)
    started = time.perf_counter()
    trained = _train_round(warmup, strategies[keys[0]], data, backend, 0, initial, None)
    round0, after0 = _aggregate_and_measure(warmup, strategies[keys[0]], data, model,
                                            base.tokenizer, 0, trained,
                                            time.perf_counter() - started)  # fmt: skip
    started = time.perf_counter()
    trained = _train_round(first, strategies[keys[0]], data, backend, 1, after0, initial)
    training = time.perf_counter() - started
    for key in keys:
        config = configs[key]
        round1, final = _aggregate_and_measure(config, strategies[key], data, model,
                                               base.tokenizer, 1, trained, training)  # fmt: skip
        rounds = (round0, round1)
        summary = SimulationResult(config, rounds, final, data.skew).summary()
        write_metrics(Path(folders[key]), config.to_dict(), rounds, summary)


def shared_keys(configs: Sequence[object]) -> bool:
    """Whether ``configs`` differ only in strategy, lambda and the factor aligned first (so
    they can share their uploads)."""
    plain = [replace(c, strategy="fedit", lam=0.0, align_first="A").to_dict() for c in configs]
    for entry in plain:
        entry["extra"] = {k: v for k, v in entry["extra"].items() if k != "label"}
    return all(entry == plain[0] for entry in plain)
