"""How far a run is: its stage now, the time it may still take, and its best held-out figure.

Pure functions of rows (and the time given): no I/O, no clocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from enum import StrEnum

from fedrot_server.runs.control import Activity, LiveStatus
from fedrot_server.dashboard.schemas import BestMetric
from fedrot_server.storage.state import RoundPhase, RoundRow, RunRow

# The quality figure of a run's rounds, in order of preference, and whether higher is better.
QUALITY_METRICS = (("accuracy", True), ("exact_match", True), ("perplexity", False))


class Stage(StrEnum):
    """What a run does now, as the page's round card says it."""

    QUEUED = "queued"
    WAITING = "waiting"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    FINISHED = "finished"
    STOPPED = "stopped"


def stage_of(run: RunRow, rounds: Sequence[RoundRow], live: LiveStatus | None) -> Stage:
    """The live activity when this server runs the run, else what the records imply; a closed
    last round whose held-out evaluation is still running reads ``evaluating``."""
    phase = run.phase.value
    if phase in (Stage.QUEUED, Stage.FINISHED, Stage.STOPPED) and live is None:
        last = rounds[-1] if rounds else None
        evaluating = last is not None and bool(last.summary.get("evaluating"))
        return Stage.EVALUATING if evaluating and phase == Stage.FINISHED else Stage(phase)
    if live is not None and live.activity is Activity.AGGREGATING:
        return Stage.AGGREGATING
    if live is not None and live.activity is Activity.DONE:
        return Stage.STOPPED if phase == Stage.STOPPED else Stage.FINISHED
    last = rounds[-1] if rounds else None
    if last is not None and last.phase is RoundPhase.OPEN:
        return Stage.TRAINING
    if last is not None and last.summary.get("evaluating"):
        return Stage.EVALUATING
    return Stage.WAITING


def eta_seconds(run: RunRow, rounds: Sequence[RoundRow], stage: Stage, now: float) -> float | None:
    """Seconds until the last round closes: the mean duration of the closed rounds times the
    rounds still to close, less the open round's time so far (None: no estimate)."""
    total = run.spec.get("rounds")
    durations = [r.closed_at - r.opened_at for r in rounds
                 if r.phase is RoundPhase.CLOSED and r.closed_at is not None]  # fmt: skip
    if stage in (Stage.FINISHED, Stage.STOPPED, Stage.QUEUED) or not isinstance(total, int):
        return None
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    remaining = max(0, total - len(durations))
    last = rounds[-1] if rounds else None
    spent = now - last.opened_at if last is not None and last.phase is RoundPhase.OPEN else 0.0
    return max(0.0, remaining * mean - spent)


def best_metric(rounds: Sequence[RoundRow]) -> BestMetric | None:
    """The best held-out quality figure of the closed rounds (accuracy, else exact match,
    else the lowest perplexity); None when no round reported one."""
    for name, higher in QUALITY_METRICS:
        found = [(float(v), r.round_index) for r in rounds
                 if isinstance(v := _evaluation(r).get(name), int | float)]  # fmt: skip
        if found:
            value, index = (max if higher else min)(found, key=lambda pair: pair[0])
            return BestMetric(name=name, value=value, round=index)
    return None


def _evaluation(row: RoundRow) -> Mapping[str, Any]:
    value = row.summary.get("evaluation")
    return value if isinstance(value, Mapping) else {}
