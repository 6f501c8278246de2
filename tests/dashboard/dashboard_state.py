"""A recorded run for the dashboard tests: a real SQLite state written by the server's own
store and telemetry log, round reports and adapter folders as the server lays them out.

Importable as ``dashboard_state`` (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path

from fastapi.testclient import TestClient

from fedrot_server.dashboard import create_app
from fedrot_server.runs.control import Activity, LiveStatus
from fedrot_server.errors import NotFoundError, WrongStateError
from fedrot_server.storage.state import RunPhase, UploadRow
from fedrot_server.storage.store import SqliteStore, open_reader
from fedrot_server.storage.telemetry import TelemetryLog, open_telemetry_reader

RUN = "run-0123456789ab"
T0 = 1_700_000_000.0
MODULES = ("base_model.model.encoder.0.query", "base_model.model.encoder.0.value")
SPEC = {
    "run_id": RUN, "rounds": 3, "seed": 0,
    "model": {"name": "tiny-bert", "task": "classification", "num_labels": 2},
    "lora": {"rank": 2, "alpha": 4.0}, "strategy": {"name": "fedrot", "alignment_strength": 0.4},
}  # fmt: skip
INSTRUCT_RUN = "run-instruct0123"
INSTRUCT_SPEC = {
    "run_id": INSTRUCT_RUN, "rounds": 3, "seed": 0,
    "model": {"name": "tiny-llama", "task": "causal-lm"},
    "lora": {"rank": 2, "alpha": 4.0}, "strategy": {"name": "fedrot", "alignment_strength": 0.4},
}  # fmt: skip
# Held-out metrics of the instruction-tuning run's rounds 0, 1, 2: (exact match, perplexity).
INSTRUCT_EVALUATION = ((0.125, 12.5), (0.25, 8.0), (0.5, 6.25))


@dataclass
class RecordedRun:
    state_dir: Path
    weights: dict[str | None, bytes] = field(default_factory=dict)

    @property
    def db(self) -> Path:
        return self.state_dir / "fedrot.sqlite3"

    @property
    def runs_root(self) -> Path:
        return self.state_dir / "runs"


def upload(round_index: int, client: str, samples: int, size: int, loss: float, at: float,
           run_id: str = RUN) -> UploadRow:  # fmt: skip
    return UploadRow(run_id=run_id, round_index=round_index, client=client,
                     idempotency_key=f"{client}-{round_index}", sample_count=samples,
                     size_bytes=size, sha256="0" * 64, received_at=at, sequence=0,
                     metrics={"train_loss": loss})  # fmt: skip


def write_adapter(run: RecordedRun, round_index: int | None, payload: bytes,
                  run_id: str = RUN) -> None:  # fmt: skip
    base = run.runs_root / run_id / ("initial" if round_index is None else f"rounds/{round_index}")
    folder = base / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(payload)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    run.weights[round_index] = payload


def report(round_index: int, scale: float = 1.0) -> dict:
    """A round's report: FedRot aligning A; alice rotated more than bob (``scale`` times the
    round-0 figures)."""
    rotations = {"alice": (0.3 * scale, 0.5 * scale), "bob": (0.1 * scale, 0.2 * scale)}
    return {
        "summary": {"round": round_index},
        "aggregation": {
            "aligned": "A", "aggregation_error": 0.02, "relative_aggregation_error": 0.01,
            "modules": [{"module": m, "aggregation_error": 0.01 * (i + 1) * scale,
                         "relative_aggregation_error": 0.005, "update_norm": 2.0}
                        for i, m in enumerate(MODULES)],
            "clients": [{"client_id": c, "weight": 1.0,
                         "rotations": [{"module": m, "rotation_distance": d[i],
                                        "residual_before": 1.0, "residual_after": 0.5}
                                       for i, m in enumerate(MODULES)]}
                        for c, d in rotations.items()],
        },
    }  # fmt: skip


def record_run(state_dir: Path) -> RecordedRun:
    """Run RUN: alice, bob, carol (revoked later); round 0 closed, round 1 open with alice
    reported and bob's upload refused; telemetry of downloads."""
    run = RecordedRun(state_dir)
    store = SqliteStore(run.db)
    store.sync_client_tokens({n: f"token-of-{n}-0123456789" for n in ("alice", "bob", "carol")})
    store.create_run(RUN, SPEC, T0)
    for i, name in enumerate(("alice", "bob", "carol")):
        store.enroll(RUN, name, {"host": f"h{i}"}, T0 + i)
    store.open_round(RUN, 0, ["alice", "bob"], T0 + 10, T0 + 70)
    store.record_upload(upload(0, "alice", 10, 1000, 1.5, T0 + 20))
    store.record_upload(upload(0, "bob", 30, 3000, 0.5, T0 + 25))
    store.close_round(RUN, 0, at=T0 + 40, reporters=["alice", "bob"], adapter_sha256="ab" * 32,
                      summary={"samples": 40, "bytes_in": 4000, "bytes_out": 2500,
                               "aggregation_error": 0.02, "relative_aggregation_error": 0.01,
                               "client_metrics": {"train_loss": 0.75},
                               "evaluation": {"accuracy": 0.625}, "duration_s": 30.0,
                               "extensions": 0})  # fmt: skip
    store.record_metrics(RUN, 0, "server", {"accuracy": 0.625})
    store.open_round(RUN, 1, ["alice", "bob", "carol"], T0 + 50, T0 + 110)
    store.record_upload(upload(1, "alice", 12, 1100, 0.9, T0 + 60))
    store.touch(RUN, "alice", T0 + 60)
    store.touch(RUN, "bob", T0 + 61)
    store.revoke_client("carol")
    store.close()
    telemetry = TelemetryLog(run.db)
    telemetry.record_refusal(RUN, 0, "bob", "INVALID_ARGUMENT", "old refusal, later accepted", T0 + 22)
    telemetry.record_refusal(RUN, 1, "bob", "INVALID_ARGUMENT", "sha256 mismatch", T0 + 62)
    telemetry.record_download(RUN, 0, "alice", 1200)
    telemetry.record_download(RUN, 1, "alice", 1300)
    telemetry.record_download(RUN, 0, "bob", 1250)
    telemetry.close()
    write_adapter(run, None, b"initial-weights-" * 8)
    write_adapter(run, 0, b"round-0-weights-" * 8)
    path = run.runs_root / RUN / "rounds" / "0" / "report.json"
    path.write_text(json.dumps(report(0)))
    return run


def record_instruction_run(state_dir: Path) -> RecordedRun:
    """Run INSTRUCT_RUN, instruction tuning of a causal LM: alice and bob, three closed rounds
    whose summaries report held-out exact match, completion perplexity and loss
    (INSTRUCT_EVALUATION); the run is finished."""
    run = RecordedRun(state_dir)
    store = SqliteStore(run.db)
    store.sync_client_tokens({n: f"token-of-{n}-0123456789" for n in ("alice", "bob")})
    store.create_run(INSTRUCT_RUN, INSTRUCT_SPEC, T0)
    for i, name in enumerate(("alice", "bob")):
        store.enroll(INSTRUCT_RUN, name, {"host": f"h{i}"}, T0 + i)
    for t, (exact_match, perplexity) in enumerate(INSTRUCT_EVALUATION):
        start = T0 + 100 * t
        store.open_round(INSTRUCT_RUN, t, ["alice", "bob"], start + 10, start + 70)
        for j, name in enumerate(("alice", "bob")):
            store.record_upload(upload(t, name, 20, 1000, 2.0 - 0.5 * t, start + 20 + j,
                                       run_id=INSTRUCT_RUN))  # fmt: skip
        evaluation = {"exact_match": exact_match, "perplexity": perplexity,
                      "loss": math.log(perplexity)}  # fmt: skip
        store.close_round(INSTRUCT_RUN, t, at=start + 40, reporters=["alice", "bob"],
                          adapter_sha256=f"{t:02x}" * 32,
                          summary={"samples": 40, "bytes_in": 2000, "bytes_out": 2000,
                                   "aggregation_error": 0.02 / (t + 1),
                                   "relative_aggregation_error": 0.01 / (t + 1),
                                   "client_metrics": {"train_loss": 2.0 - 0.5 * t},
                                   "evaluation": evaluation, "duration_s": 30.0,
                                   "extensions": 0})  # fmt: skip
        store.record_metrics(INSTRUCT_RUN, t, "server", evaluation)
    store.set_run_phase(INSTRUCT_RUN, RunPhase.FINISHED, at=T0 + 400)
    store.close()
    TelemetryLog(run.db).close()  # its (empty) tables, as a server leaves them
    return run


SHOWCASE_RUN = "run-showcase0001"
SHOWCASE_ROUNDS = 8
SHOWCASE_CLOSED = 6  # rounds 0 .. 5 closed, round 6 open: "round 7 of 8"
SHOWCASE_SPEC = {
    "run_id": SHOWCASE_RUN, "rounds": SHOWCASE_ROUNDS, "seed": 0,
    "model": {"name": "MiniLM-L6", "task": "classification", "num_labels": 4},
    "lora": {"rank": 8, "alpha": 16.0}, "strategy": {"name": "fedrot", "alignment_strength": 0.5},
}  # fmt: skip
# Held-out accuracy of the showcase run's closed rounds.
SHOWCASE_ACCURACY = (0.362, 0.455, 0.521, 0.587, 0.634, 0.672)


def showcase_summary(t: int) -> dict:
    """Round ``t``'s closing summary, with the diagnostics a newer server adds."""
    error = 0.08 / (1 + t)
    return {"samples": 300, "bytes_in": 3 * 390_000, "bytes_out": 3 * 390_000,
            "aggregation_error": error, "relative_aggregation_error": error / 2.5,
            "fedit_aggregation_error": 2.2 * error, "fedit_relative_aggregation_error": 2.2 * error / 2.5,
            "rotation_drift_share": 0.55 + 0.03 * t,
            "client_metrics": {"train_loss": 1.35 / (1 + 0.35 * t)},
            "evaluation": {"accuracy": SHOWCASE_ACCURACY[t]}, "duration_s": 40.0 + 3 * t,
            "extensions": 0, "evaluating": False}  # fmt: skip


def record_showcase_run(state_dir: Path, now: float) -> RecordedRun:
    """Two runs in one state: INSTRUCT_RUN (finished, older) and SHOWCASE_RUN, the newest:
    alice, bob and carol over SHOWCASE_ROUNDS rounds, SHOWCASE_CLOSED of them closed (with
    reports, adapters and the drift and FedIT diagnostics; ``weights`` holds these), the next one open with alice and
    bob reported, opened 25 s before ``now``, its deadline 95 s after."""
    run = record_instruction_run(state_dir)
    for t in (None, 0, 1, 2):  # the finished run's adapters stay downloadable
        write_adapter(run, t, f"instruct-{t}-weights-".encode() * 8, INSTRUCT_RUN)
    store = SqliteStore(run.db)
    store.sync_client_tokens({n: f"token-of-{n}-0123456789" for n in ("alice", "bob", "carol")})
    start = now - 60.0 * SHOWCASE_CLOSED - 30.0
    store.create_run(SHOWCASE_RUN, SHOWCASE_SPEC, start)
    for i, name in enumerate(("alice", "bob", "carol")):
        store.enroll(SHOWCASE_RUN, name, {"host": f"node-{i}"}, start + i)
    clients = ["alice", "bob", "carol"]
    for t in range(SHOWCASE_CLOSED + 1):
        opened = start + 5 + 60.0 * t
        store.open_round(SHOWCASE_RUN, t, clients, opened, opened + 120)
        for j, name in enumerate(clients if t < SHOWCASE_CLOSED else clients[:2]):
            loss = 1.4 / (1 + 0.35 * t) + 0.05 * j
            store.record_upload(upload(t, name, 100, 390_000, loss, opened + 20 + j, SHOWCASE_RUN))
        if t == SHOWCASE_CLOSED:
            break
        store.close_round(SHOWCASE_RUN, t, at=opened + 40 + 3 * t, reporters=clients,
                          adapter_sha256=f"{t:02x}" * 32, summary=showcase_summary(t))  # fmt: skip
        write_adapter(run, t, f"showcase-round-{t}-".encode() * 8, SHOWCASE_RUN)
        path = run.runs_root / SHOWCASE_RUN / "rounds" / str(t) / "report.json"
        path.write_text(json.dumps(report(t, scale=1.0 / (1 + t))))
    for j, name in enumerate(clients):
        store.touch(SHOWCASE_RUN, name, now - 3 - 4 * j)
    store.close()
    write_adapter(run, None, b"showcase-initial-" * 8, SHOWCASE_RUN)
    return run


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeControl:
    """A :class:`~fedrot_server.runs.control.RunControl` recording the actions it was asked for."""

    def __init__(self, run_id: str = RUN, activity: Activity = Activity.TRAINING) -> None:
        self.run_id, self.activity = run_id, activity
        self.paused = False
        self.calls: list[str] = []

    def status(self) -> LiveStatus:
        return LiveStatus(self.run_id, self.activity, self.paused)

    async def pause(self) -> None:
        self._check()
        self.calls.append("pause")
        self.paused = True

    async def resume(self) -> None:
        self._check()
        self.calls.append("resume")
        self.paused = False

    async def close_round(self) -> int:
        if self.activity is not Activity.TRAINING:
            raise WrongStateError("no round is open")
        self.calls.append("close_round")
        return 1

    async def revoke(self, client: str) -> None:
        if client not in ("alice", "bob", "carol"):
            raise NotFoundError(f"no client named {client!r}")
        self.calls.append(f"revoke {client}")

    def _check(self) -> None:
        if self.activity is Activity.DONE:
            raise WrongStateError("the run is over")


def serve_recorded(run: RecordedRun, now: float, **kwargs: object) -> Iterator[TestClient]:
    """A test client of the dashboard over ``run``'s database, its clock stopped at ``now``
    (``kwargs`` go to ``create_app``); a generator: ``yield from`` it in a fixture."""
    reader, telemetry = open_reader(run.db), open_telemetry_reader(run.db)
    app = create_app(reader, telemetry=telemetry, runs_root=run.runs_root, clock=lambda: now,
                     **kwargs)  # fmt: skip
    try:
        with TestClient(app) as client:
            yield client
    finally:
        reader.close()
        telemetry.close()
