"""The dashboard's views, built from the state (rows), the telemetry and the round reports.

Pure functions of what they are given (the time too): no I/O of their own beyond the
``RunFiles`` reads, no clocks, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedrot_server.runs.control import Activity, ClientProgress, LiveStatus
from fedrot_server.dashboard.files import RunFiles
from fedrot_server.dashboard.hints import lambda_hint
from fedrot_server.dashboard.progress import Stage, best_metric, eta_seconds, stage_of
from fedrot_server.dashboard.schemas import (
    ClientInfo,
    ModuleInfo,
    Overview,
    RoundInfo,
    RoundModules,
    RunInfo,
)
from fedrot_server.storage.state import ClientRow, RoundPhase, RoundRow, RunPhase, RunRow, UploadRow
from fedrot_server.storage.telemetry import InterruptionRow, RefusalRow

TRAIN_LOSS = "train_loss"
ACCURACY = "accuracy"
EXACT_MATCH = "exact_match"
PERPLEXITY = "perplexity"


@dataclass(frozen=True)
class RunState:
    """Everything recorded about one run, read once per request."""

    run: RunRow
    rounds: list[RoundRow]
    uploads: dict[int, list[UploadRow]]
    clients: list[ClientRow]

    @property
    def open_round(self) -> RoundRow | None:
        last = self.rounds[-1] if self.rounds else None
        return last if last is not None and last.phase is RoundPhase.OPEN else None

    @property
    def reported_now(self) -> set[str]:
        """The clients whose update for the open round arrived (empty: no open round)."""
        rnd = self.open_round
        return set() if rnd is None else {u.client for u in self.uploads.get(rnd.round_index, [])}

    def uploads_of(self, client: str) -> list[UploadRow]:
        """``client``'s accepted uploads, by round."""
        return [u for t in sorted(self.uploads) for u in self.uploads[t] if u.client == client]


def run_info(run: RunRow, rounds: Sequence[RoundRow] = ()) -> RunInfo:
    """The run's row in the runs table (``rounds``: its rounds, for the best metric)."""
    spec = run.spec
    rounds_total, strategy = spec.get("rounds"), _section(spec, "strategy")
    strength = strategy.get("alignment_strength")
    return RunInfo(run_id=run.run_id, created_at=run.created_at, phase=run.phase.value,
                   rounds_completed=run.rounds_completed,
                   rounds_total=rounds_total if isinstance(rounds_total, int) else None,
                   finished_at=run.finished_at, queue_position=run.queue_position,
                   strategy=strategy.get("name"),
                   alignment_strength=strength if isinstance(strength, int | float) else None,
                   task=_section(spec, "model").get("task"), best=best_metric(rounds))  # fmt: skip


def activity_of(state: RunState, live: LiveStatus | None) -> Activity:
    """The live activity when this server runs the run, else what the records imply."""
    if live is not None:
        return live.activity
    if state.run.phase in (RunPhase.FINISHED, RunPhase.STOPPED):
        return Activity.DONE
    return Activity.TRAINING if state.open_round is not None else Activity.WAITING


def overview(state: RunState, live: LiveStatus | None, now: float) -> Overview:
    spec = state.run.spec
    model, strategy, lora = (_section(spec, k) for k in ("model", "strategy", "lora"))
    current = state.rounds[-1] if state.rounds else None
    is_open = current is not None and current.phase is RoundPhase.OPEN
    reported = len(state.reported_now) if is_open else 0
    if current is not None and not is_open:
        reported = len(current.reporters)
    stage = stage_of(state.run, state.rounds, live)
    counting = is_open and stage is Stage.TRAINING  # aggregating: the deadline no longer runs
    return Overview(
        run=run_info(state.run, state.rounds), base_model=model.get("name"),
        task=model.get("task"), strategy=strategy.get("name"),
        alignment_strength=strategy.get("alignment_strength"),
        lambda_hint=lambda_hint(strategy.get("name"), strategy.get("alignment_strength"),
                                state.rounds),  # fmt: skip
        lora_rank=lora.get("rank"), activity=activity_of(state, live).value,
        paused=bool(live and live.paused), live=live is not None,
        current_round=None if current is None else current.round_index,
        round_number=None if current is None else current.round_index + 1,
        round_phase=None if current is None else current.phase.value, stage=stage.value,
        deadline=current.deadline if counting else None,
        seconds_left=max(0.0, current.deadline - now) if counting else None,
        eta_s=eta_seconds(state.run, state.rounds, stage, now),
        clients_enrolled=len(state.clients),
        clients_sampled=0 if current is None else len(current.participants),
        clients_reported=reported, server_time=now,
    )  # fmt: skip


def rounds_view(state: RunState) -> list[RoundInfo]:
    return [round_info(row, state.uploads.get(row.round_index, [])) for row in state.rounds]


def round_info(row: RoundRow, uploads: Sequence[UploadRow]) -> RoundInfo:
    """A round's figures: from its closing summary, or from its uploads while it is open."""
    summary = row.summary
    evaluation = {k: float(v) for k, v in _section(summary, "evaluation").items()
                  if isinstance(v, int | float)}  # fmt: skip
    loss = _section(summary, "client_metrics").get(TRAIN_LOSS)
    if row.phase is RoundPhase.OPEN:
        loss = weighted_mean(uploads, TRAIN_LOSS)
    closed = row.phase is RoundPhase.CLOSED
    return RoundInfo(
        round=row.round_index, phase=row.phase.value, opened_at=row.opened_at,
        closed_at=row.closed_at, deadline=row.deadline, participants=list(row.participants),
        reporters=list(row.reporters) if closed else [u.client for u in uploads],
        samples=summary.get("samples", sum(u.sample_count for u in uploads)),
        train_loss=loss, accuracy=evaluation.get(ACCURACY),
        exact_match=evaluation.get(EXACT_MATCH), perplexity=evaluation.get(PERPLEXITY),
        evaluation=evaluation,
        aggregation_error=summary.get("aggregation_error"),
        relative_aggregation_error=summary.get("relative_aggregation_error"),
        fedit_aggregation_error=_number(summary.get("fedit_aggregation_error")),
        fedit_relative_aggregation_error=_number(summary.get("fedit_relative_aggregation_error")),
        rotation_drift_share=_number(summary.get("rotation_drift_share")),
        evaluating=bool(summary.get("evaluating", False)),
        bytes_in=summary.get("bytes_in", sum(u.size_bytes for u in uploads)),
        bytes_out=summary.get("bytes_out", 0), duration_s=summary.get("duration_s"),
        extensions=summary.get("extensions", 0), adapter_sha256=row.adapter_sha256,
    )  # fmt: skip


def weighted_mean(uploads: Sequence[UploadRow], name: str) -> float | None:
    pairs = [(u.sample_count, u.metrics[name]) for u in uploads if name in u.metrics]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total > 0 else None


def client_status(client: ClientRow, open_round: RoundRow | None, reported: set[str],
                  now: float, timeout_s: float) -> str:  # fmt: skip
    """revoked, declined (the run: its data does not fit), training (a participant of the
    open round), reported, live or silent."""
    if client.revoked:
        return "revoked"
    if client.declined:
        return "declined"
    if open_round is not None and client.name in open_round.participants:
        return "reported" if client.name in reported else "training"
    return "live" if now - client.last_seen <= timeout_s else "silent"


@dataclass(frozen=True)
class UploadEvents:
    """What befell uploads besides their acceptance: refusals and interruptions (telemetry)."""

    refusals: Sequence[RefusalRow] = ()
    interruptions: Sequence[InterruptionRow] = ()

    def latest(self, client: str, accepted_at: float | None) -> RefusalRow | InterruptionRow | None:
        """``client``'s latest refusal or interruption, if later than its last accepted upload."""
        mine = [e for e in (*self.refusals, *self.interruptions) if e.client == client]
        event = max(mine, key=lambda e: e.at, default=None)
        if event is None or (accepted_at is not None and event.at <= accepted_at):
            return None
        return event


def clients_view(
    state: RunState,
    files: RunFiles,
    events: UploadEvents,
    bytes_down: Mapping[str, int],
    *,
    now: float,
    timeout_s: float,
    live: LiveStatus | None = None,
) -> list[ClientInfo]:
    """Every client of the run; ``live`` (this server runs it now) adds each client's latest
    heartbeat: its phase and the fraction of it done, for the open round only."""
    rotations = latest_rotations(state, files)
    progress = {} if live is None else live.progress
    open_round, reported = state.open_round, state.reported_now
    out = []
    for client in state.clients:
        mine = state.uploads_of(client.name)
        last = max(mine, key=lambda u: u.received_at, default=None)
        event = events.latest(client.name, None if last is None else last.received_at)
        refusal = event if isinstance(event, RefusalRow) else None
        cut = event if isinstance(event, InterruptionRow) else None
        mean, worst, where = rotations.get(client.name, (None, None, None))
        out.append(ClientInfo(
            name=client.name, status=client_status(client, open_round, reported, now, timeout_s),
            enrolled_at=client.enrolled_at, last_seen=client.last_seen,
            rounds_joined=sum(client.name in r.participants for r in state.rounds),
            rounds_reported=len({u.round_index for u in mine}),
            samples=sum(u.sample_count for u in mine), bytes_up=sum(u.size_bytes for u in mine),
            bytes_down=bytes_down.get(client.name, 0),
            last_train_loss=None if last is None else last.metrics.get(TRAIN_LOSS),
            rotation_distance=mean, rotation_distance_max=worst, rotation_round=where,
            last_upload_refused=refusal is not None,
            refusal_reason=None if refusal is None else refusal.reason,
            refusal_detail=None if refusal is None else refusal.detail,
            last_upload_interrupted=cut is not None,
            interruption_detail=None if cut is None else cut.detail, info=dict(client.info),
            declined=client.declined,
            **heartbeat_fields(progress.get(client.name), open_round),
        ))  # fmt: skip
    return out


def heartbeat_fields(beat: ClientProgress | None, open_round: RoundRow | None) -> dict[str, Any]:
    """``phase`` and ``progress`` of a heartbeat about the open round (else none)."""
    if beat is None or open_round is None or beat.round_index != open_round.round_index:
        return {"phase": None, "progress": None, "progress_at": None}
    return {"phase": beat.phase, "progress": beat.fraction, "progress_at": beat.at}


def latest_rotations(
    state: RunState, files: RunFiles
) -> dict[str, tuple[float, float, int]]:
    """Per client: (mean, max) rotation distance over modules in its latest aligned round."""
    found: dict[str, tuple[float, float, int]] = {}
    for row in reversed(state.rounds):
        if row.phase is not RoundPhase.CLOSED:
            continue
        report = files.report(state.run.run_id, row.round_index) or {}
        for entry in _section(report, "aggregation").get("clients", []):
            distances = [r["rotation_distance"] for r in entry.get("rotations", [])
                         if isinstance(r.get("rotation_distance"), int | float)]  # fmt: skip
            name = entry.get("client_id")
            if distances and name not in found:
                found[name] = (sum(distances) / len(distances), max(distances), row.round_index)
    return found


def modules_view(state: RunState, files: RunFiles, round_index: int | None = None) -> RoundModules:
    """Per-module error and mean rotation of round ``round_index`` (None: the latest closed
    round that has a report)."""
    candidates = [r.round_index for r in state.rounds if r.phase is RoundPhase.CLOSED]
    if round_index is not None:
        report = files.report(state.run.run_id, round_index) if round_index in candidates else None
        if report is None:
            return RoundModules(round=round_index, aligned=None, modules=[])
        return module_table(round_index, _section(report, "aggregation"))
    for index in reversed(candidates):
        report = files.report(state.run.run_id, index)
        if report is not None:
            return module_table(index, _section(report, "aggregation"))
    return RoundModules(round=None, aligned=None, modules=[])


def module_table(round_index: int, aggregation: Mapping[str, Any]) -> RoundModules:
    sums: dict[str, list[float]] = {}
    for entry in aggregation.get("clients", []):
        for rotation in entry.get("rotations", []):
            value = rotation.get("rotation_distance")
            if isinstance(value, int | float):
                sums.setdefault(rotation.get("module"), []).append(float(value))
    modules = [
        ModuleInfo(module=m["module"], aggregation_error=m.get("aggregation_error"),
                   relative_aggregation_error=m.get("relative_aggregation_error"),
                   update_norm=m.get("update_norm"),
                   rotation_distance=_mean(sums.get(m["module"])))  # fmt: skip
        for m in aggregation.get("modules", [])
    ]
    return RoundModules(round=round_index, aligned=aggregation.get("aligned"), modules=modules)


def _number(value: Any) -> float | None:
    """``value`` when it is a number (a summary key a newer server writes may be absent)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _mean(values: Sequence[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}
