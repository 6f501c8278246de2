"""Prometheus metrics of the current run, read from the state at each scrape.

A custom collector (no counters kept in memory: a restarted dashboard reports the same
numbers). Labelled by ``run``; refused uploads also by ``reason`` (the status name);
interrupted uploads (streams that broke off, their bytes held for a resume) are counted apart.
The latest closed round's aggregation errors and held-out metrics (``fedrot_eval_*``) are
exported when that round has them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from fedrot_server.dashboard import views
from fedrot_server.dashboard.errors import ApiError
from fedrot_server.dashboard.sources import CURRENT, Sources
from fedrot_server.storage.state import RoundPhase

DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
# The held-out metrics of the global adapter exported from a round summary's ``evaluation``
# (key: what the help text calls it); each gauge is ``fedrot_eval_<key>``.
EVALUATION_METRICS = {
    "accuracy": "accuracy (fraction in [0, 1]; classification)",
    "exact_match": "exact match (fraction in [0, 1]; greedy generation, instruction tuning)",
    "perplexity": "perplexity (causal LM; completion tokens only for instruction tuning)",
    "loss": "loss (mean cross-entropy; per completion token for instruction tuning)",
}


class RunCollector(Collector):
    """Collects the metrics of the current run (nothing when there is no run)."""

    def __init__(self, sources: Sources) -> None:
        self._sources = sources

    def collect(self) -> Iterator:
        try:
            state = self._sources.state(CURRENT)
        except ApiError:
            return
        run = state.run.run_id
        rounds = views.rounds_view(state)
        closed = [r for r in rounds if r.phase == RoundPhase.CLOSED.value]
        yield _gauge("fedrot_rounds_completed", "Rounds closed", run, state.run.rounds_completed)
        current = rounds[-1].round if rounds else -1
        yield _gauge("fedrot_current_round", "Index of the latest round (-1: none)", run, current)
        yield self._clients(state, run)
        yield self._bytes(rounds, run)
        if closed:
            last = closed[-1]
            for name in ("aggregation_error", "relative_aggregation_error"):
                value = getattr(last, name)
                if value is not None:
                    yield _gauge(f"fedrot_{name}", f"{name.replace('_', ' ')} of the latest "
                                 "closed round (Frobenius norm)", run, value)  # fmt: skip
            yield from _evaluation(last.evaluation, run)
        yield self._refusals(run)
        yield self._interruptions(run)
        yield _durations(closed, run)

    def _clients(self, state: views.RunState, run: str) -> GaugeMetricFamily:
        family = GaugeMetricFamily("fedrot_clients", "Enrolled clients by status",
                                   labels=["run", "status"])  # fmt: skip
        now, timeout = self._sources.clock(), self._sources.client_timeout_s
        open_round, reported = state.open_round, state.reported_now
        counts: dict[str, int] = {}
        for client in state.clients:
            status = views.client_status(client, open_round, reported, now, timeout)
            counts[status] = counts.get(status, 0) + 1
        for status in ("training", "reported", "live", "silent", "revoked", "declined"):
            family.add_metric([run, status], counts.get(status, 0))
        return family

    def _bytes(self, rounds: list, run: str) -> CounterMetricFamily:
        family = CounterMetricFamily("fedrot_transfer_bytes", "Bytes of adapters moved",
                                     labels=["run", "direction"])  # fmt: skip
        down = sum(d.size_bytes for d in self._sources.downloads(run))
        family.add_metric([run, "up"], sum(r.bytes_in for r in rounds))
        family.add_metric([run, "down"], down)
        return family

    def _refusals(self, run: str) -> CounterMetricFamily:
        family = CounterMetricFamily("fedrot_refused_uploads", "Refused uploads by reason",
                                     labels=["run", "reason"])  # fmt: skip
        counts: dict[str, int] = {}
        for refusal in self._sources.refusals(run):
            counts[refusal.reason] = counts.get(refusal.reason, 0) + 1
        for reason, count in sorted(counts.items()):
            family.add_metric([run, reason], count)
        return family

    def _interruptions(self, run: str) -> CounterMetricFamily:
        family = CounterMetricFamily("fedrot_interrupted_uploads",
                                     "Upload streams that broke off (bytes held for a resume)",
                                     labels=["run"])  # fmt: skip
        family.add_metric([run], len(self._sources.interruptions(run)))
        return family


def _gauge(name: str, documentation: str, run: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["run"])
    family.add_metric([run], value)
    return family


def _evaluation(evaluation: dict[str, float], run: str) -> Iterator[GaugeMetricFamily]:
    """``fedrot_eval_<key>`` for each held-out metric in ``evaluation`` (absent ones: none)."""
    for key, what in EVALUATION_METRICS.items():
        if key in evaluation:
            yield _gauge(f"fedrot_eval_{key}", f"Held-out {what} of the global adapter of the "
                         "latest closed round", run, evaluation[key])  # fmt: skip


def _durations(closed: list, run: str) -> HistogramMetricFamily:
    values = [r.duration_s for r in closed if r.duration_s is not None]
    buckets = [(str(b), sum(v <= b for v in values)) for b in DURATION_BUCKETS]
    buckets.append(("+Inf", len(values)))
    family = HistogramMetricFamily("fedrot_round_duration_seconds", "Wall time of closed rounds",
                                   labels=["run"])  # fmt: skip
    family.add_metric([run], buckets, sum_value=sum(values))
    return family


def metrics_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def build_registry(sources: Sources) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(sources))
    return registry
