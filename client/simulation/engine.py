"""The federation loop: broadcast, local training on the sampled clients, aggregation, evaluation.

One base model with LoRA lives in this process. Every round the strategy's plan says which
factors the clients train; the backend trains each sampled client from the broadcast global
adapter; the strategy's streaming aggregator (the server's own code, :mod:`fedrot.strategies`)
aligns and averages the uploads with ``n_i`` = samples processed; the new global adapter is
evaluated on the held-out set.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch import Tensor

from fedrot.adapters import Adapter
from fedrot.aggregation import update_weight
from fedrot.diagnostics import AggregationReport
from fedrot.strategies import RoundPlan, build_strategy
from fedrot_client.instructions import InstructionData, use_chat_template
from fedrot_client.lora import attach_lora, export_adapter, load_adapter
from fedrot_client.models import load_base_model
from fedrot_client.simulation.backends import (
    ClientJob,
    InProcessBackend,
    RayBackend,
    TrainingBackend,
)
from fedrot_client.simulation.client_basis import report_in_basis
from fedrot_client.simulation.client_starts import ClientStart, plan_starts, train_from_starts
from fedrot_client.simulation.config import BackendName, SimulationConfig
from fedrot_client.simulation.federated_data import FederatedData
from fedrot_client.simulation.held_out import score_held_out
from fedrot_client.training import TrainResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundMetrics:
    """One round. ``train_loss``: sample-weighted mean local loss of the participants;
    ``eval_*``: the new global adapter on the held-out set (accuracy for classification,
    perplexity for causal LM, and exact match for instruction data; None in rounds that do not
    evaluate); errors as in
    :class:`fedrot.diagnostics.AggregationReport` (``fedit_*``: the error FedIT averaging would
    have had for the same uploads; ``factor_average_error`` is *not* that, it averages the
    factors after the gauge);
    ``rotation_*``: mean over clients and modules of ``||R - I||_F`` and of the aligned
    factor's distance to the reference before / after the rotation (None when not aligned);
    ``rotation_drift_share``: the share of ``sum_i p_i ||X_i - X_ref||^2`` (summed over modules)
    that the optimal rotations remove, ``applied_rotation_drift_share`` the rotation applied
    (see :mod:`fedrot.drift`; None when not aligned)."""

    round_index: int
    trained: str
    aligned: str | None
    participants: int
    train_loss: float
    eval_loss: float | None
    eval_accuracy: float | None
    eval_perplexity: float | None
    eval_exact_match: float | None
    aggregation_error: float | None
    relative_aggregation_error: float | None
    factor_average_error: float | None
    fedit_aggregation_error: float | None
    fedit_relative_aggregation_error: float | None
    error_removed_share: float | None
    rotation_distance: float | None
    residual_before: float | None
    residual_after: float | None
    rotation_drift_share: float | None
    applied_rotation_drift_share: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SimulationResult:
    """Every round's metrics and the final global adapter (PEFT keys, float32, CPU)."""

    config: SimulationConfig
    rounds: tuple[RoundMetrics, ...]
    final_adapter: Mapping[str, Tensor]
    label_skew: float

    def summary(self) -> dict[str, Any]:
        """Best and final held-out metric, the mean relative aggregation error (the round's own
        and FedIT's for the same uploads) and the mean rotation drift share of aligned rounds."""
        accuracies = [r.eval_accuracy for r in self.rounds if r.eval_accuracy is not None]
        perplexities = [r.eval_perplexity for r in self.rounds if r.eval_perplexity is not None]
        matches = [r.eval_exact_match for r in self.rounds if r.eval_exact_match is not None]
        errors = [r.relative_aggregation_error for r in self.rounds
                  if r.relative_aggregation_error is not None]  # fmt: skip
        last = self.rounds[-1]
        losses = [r.eval_loss for r in self.rounds if r.eval_loss is not None]
        return {
            "best_accuracy": max(accuracies) if accuracies else None,
            "final_accuracy": last.eval_accuracy,
            "best_perplexity": min(perplexities) if perplexities else None,
            "final_perplexity": last.eval_perplexity,
            "best_exact_match": max(matches) if matches else None,
            "final_exact_match": last.eval_exact_match,
            "final_eval_loss": last.eval_loss,
            "best_eval_loss": min(losses) if losses else None,
            "mean_relative_aggregation_error": float(np.mean(errors)) if errors else None,
            "mean_fedit_relative_aggregation_error": _mean_of(
                r.fedit_relative_aggregation_error for r in self.rounds
            ),
            "mean_rotation_drift_share": _mean_of(r.rotation_drift_share for r in self.rounds),
            "label_skew": self.label_skew,
        }


RoundCallback = Callable[[RoundMetrics], None]


def run_simulation(
    config: SimulationConfig,
    data: FederatedData,
    *,
    on_round: RoundCallback | None = None,
    ray_init: Mapping[str, Any] | None = None,
) -> SimulationResult:
    """Run ``config.rounds`` rounds over ``data.clients`` (``len == config.num_clients``).

    Loads the base model once and attaches LoRA seeded by ``config.seed``; ``on_round`` sees
    each round's metrics as soon as they exist (to write partial results).
    """
    if len(data.clients) != config.num_clients:
        raise ValueError(f"{len(data.clients)} client datasets for {config.num_clients} clients")
    base = load_base_model(config.model)
    check_chat_template(data, base.tokenizer, config.chat_template)
    model = attach_lora(base, config.lora, config.seed)
    tokenizer = base.tokenizer
    backend = _backend(config, model, tokenizer, ray_init)
    strategy = build_strategy(config.strategy, config.strategy_config())
    global_tensors = export_adapter(model)
    previous: dict[str, Tensor] | None = None  # last round's broadcast (stale clients' start)
    rounds: list[RoundMetrics] = []
    try:
        for t in range(config.rounds):
            started = time.perf_counter()
            plan = strategy.plan(t)
            jobs = _jobs(config, data, t)
            starts = _starts(config, strategy, plan, global_tensors, previous)
            results = train_from_starts(backend, starts, plan.trained, jobs)
            reference = Adapter.from_state_dict(global_tensors)
            updates = _reported_updates(config, reference, plan, jobs, results, starts)
            previous = global_tensors
            report, global_tensors = _aggregate(strategy, reference, plan, updates)
            load_adapter(model, global_tensors)
            metrics = _round_metrics(config, plan, results, report, model, tokenizer, data,
                                     time.perf_counter() - started)  # fmt: skip
            logger.info("round %s: loss %.4f eval %s rel.err %s (FedIT's %s) drift share %s",
                        t, metrics.train_loss, metrics.eval_accuracy or metrics.eval_perplexity,
                        metrics.relative_aggregation_error,
                        metrics.fedit_relative_aggregation_error,
                        metrics.rotation_drift_share)  # fmt: skip
            rounds.append(metrics)
            if on_round is not None:
                on_round(metrics)
    finally:
        backend.close()
    return SimulationResult(config, tuple(rounds), dict(global_tensors), data.skew)


def check_chat_template(
    data: FederatedData, tokenizer, template: str | None = None  # noqa: ANN001
) -> None:
    """Chat rows need a chat template: ``template`` when given (it replaces the tokenizer's),
    else the tokenizer's own; a one-line DataError before any training when there is none."""
    for dataset in (*data.clients, data.evaluation):
        if isinstance(dataset, InstructionData) and dataset.is_chat:
            use_chat_template(tokenizer, template, dataset.source)
            return


def _backend(
    config: SimulationConfig, model, tokenizer, ray_init: Mapping[str, Any] | None
) -> TrainingBackend:
    if config.backend is BackendName.RAY:
        return RayBackend(model, tokenizer, init_options=ray_init)
    return InProcessBackend(model, tokenizer)


def sample_clients(config: SimulationConfig, round_index: int) -> list[int]:
    """The sorted client indices of round ``round_index`` (all of them at fraction 1)."""
    count = config.clients_per_round()
    if count >= config.num_clients:
        return list(range(config.num_clients))
    rng = np.random.default_rng([config.seed, 3, round_index])
    return sorted(int(i) for i in rng.choice(config.num_clients, size=count, replace=False))


def _jobs(config: SimulationConfig, data: FederatedData, round_index: int) -> list[ClientJob]:
    return [
        ClientJob(f"client-{i}", data.clients[i], config.train_config(round_index, i))
        for i in sample_clients(config, round_index)
    ]


def _starts(
    config: SimulationConfig, strategy, plan: RoundPlan,
    broadcast: dict[str, Tensor], previous: dict[str, Tensor] | None,
) -> list[ClientStart]:  # fmt: skip
    """Each sampled client's start, in job order (see ``client_starts``)."""
    same = plan.round_index > 0 and strategy.plan(plan.round_index - 1).trained == plan.trained
    return plan_starts(
        seed=config.seed, round_index=plan.round_index,
        participants=sample_clients(config, plan.round_index),
        client_init=config.client_init, stale_fraction=config.stale_fraction,
        broadcast=broadcast, previous=previous,
        same_factors_as_previous=same,
    )  # fmt: skip


def _reported_updates(
    config: SimulationConfig, reference: Adapter, plan: RoundPlan, jobs: Sequence[ClientJob],
    results: Sequence[TrainResult], starts: Sequence[ClientStart],
) -> Iterator[tuple[str, Adapter, float]]:  # fmt: skip
    """Each upload (only the trained factors and the head) completed with the reference's
    frozen factor, in the basis the client reports it in: ``(client id, update, weight)``
    with weight ``n_i`` (times the staleness weight for a stale one), one at a time, as the
    server receives them."""
    for job, result, start in zip(jobs, results, starts, strict=True):
        update = reference.with_factors_from(dict(result.tensors))
        update = report_in_basis(update, config.client_basis, plan.trained, job.config.seed)
        weight = update_weight(result.num_samples, start.rounds_late, config.staleness_weight)
        yield job.client_id, update, weight


def _aggregate(
    strategy, reference: Adapter, plan: RoundPlan, updates: Iterable[tuple[str, Adapter, float]]
) -> tuple[AggregationReport, dict[str, Tensor]]:
    """The server's step: the updates streamed into the strategy's aggregator."""
    aggregator = strategy.start_round(reference, plan, track_error=True)
    for client_id, update, weight in updates:
        aggregator.add(client_id, update, weight)
    outcome = aggregator.finalize()
    return outcome.report, outcome.adapter.to_state_dict()


def _round_metrics(
    config: SimulationConfig, plan: RoundPlan, results: Sequence[TrainResult],
    report: AggregationReport, model, tokenizer, data: FederatedData, seconds: float,
) -> RoundMetrics:  # fmt: skip
    samples = sum(r.num_samples for r in results)
    train_loss = sum(r.mean_loss * r.num_samples for r in results) / max(samples, 1)
    evaluation = None
    if config.evaluates(plan.round_index):
        evaluation = score_held_out(model, tokenizer, data.evaluation, config)
    stats = [s for c in report.clients for s in c.rotations]
    return RoundMetrics(
        round_index=plan.round_index,
        trained="".join(sorted(str(f) for f in plan.trained)),
        aligned=None if report.aligned is None else str(report.aligned),
        participants=len(results),
        train_loss=train_loss,
        eval_loss=None if evaluation is None else evaluation.loss,
        eval_accuracy=None if evaluation is None else evaluation.accuracy,
        eval_perplexity=None if evaluation is None else evaluation.perplexity,
        eval_exact_match=None if evaluation is None else evaluation.exact_match,
        aggregation_error=report.aggregation_error,
        relative_aggregation_error=report.relative_aggregation_error,
        factor_average_error=report.factor_average_error,
        fedit_aggregation_error=report.fedit_aggregation_error,
        fedit_relative_aggregation_error=report.fedit_relative_aggregation_error,
        error_removed_share=report.error_removed_share,
        rotation_distance=_mean([s.rotation_distance for s in stats]),
        residual_before=_mean([s.residual_before for s in stats]),
        residual_after=_mean([s.residual_after for s in stats]),
        rotation_drift_share=report.rotation_drift_share,
        applied_rotation_drift_share=report.applied_rotation_drift_share,
        seconds=seconds,
    )


def _mean_of(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None, or None when there are none."""
    return _mean([v for v in values if v is not None])


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None
