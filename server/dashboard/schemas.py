"""The JSON shapes of the dashboard's API (``/api/v1``); they make its OpenAPI schema.

Times are Unix seconds (float); sizes are bytes; errors are Frobenius norms as the server's
round reports give them (None when not tracked).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error response: a short ``error`` and a ``detail`` naming the problem."""

    error: str
    detail: Any = None


class BestMetric(BaseModel):
    """A run's best held-out figure over its closed rounds."""

    name: str = Field(description="accuracy, exact_match (fractions in [0, 1]) or perplexity")
    value: float
    round: int = Field(description="the round (from 0) that reached it")


class RunInfo(BaseModel):
    run_id: str
    created_at: float
    phase: str = Field(description="queued, waiting, running, finished or stopped (as recorded)")
    rounds_completed: int
    rounds_total: int | None
    finished_at: float | None
    queue_position: int | None = Field(None, description="a queued run's place (1: next)")
    strategy: str | None = None
    alignment_strength: float | None = Field(None, description="lambda: 0 = FedIT, 1 = hard")
    task: str | None = None
    best: BestMetric | None = Field(None, description="best held-out metric (None: none yet)")


class Overview(BaseModel):
    """The run at a glance."""

    run: RunInfo
    base_model: str | None
    task: str | None
    strategy: str | None
    alignment_strength: float | None = Field(description="lambda: 0 = FedIT, 1 = hard alignment")
    lambda_hint: str | None = Field(
        None, description="advice on lambda from the run's drift diagnostic (FedRot runs)"
    )
    lora_rank: int | None
    activity: str = Field(description="waiting, training, aggregating or done")
    paused: bool
    live: bool = Field(description="whether this dashboard's server runs this run now")
    current_round: int | None = Field(description="index of the latest round, from 0")
    round_number: int | None = Field(description="the latest round counted from 1 (round N of M)")
    round_phase: str | None
    stage: str = Field(
        description="what the run does now: queued, waiting, training, aggregating, evaluating, "
        "finished or stopped"
    )
    deadline: float | None = Field(description="the open round's deadline while clients train")
    seconds_left: float | None = Field(description="until that deadline (None: not training)")
    eta_s: float | None = Field(
        description="estimated seconds until the last round closes, from the mean duration of "
        "the closed rounds (None: no closed round yet, or the run is over)"
    )
    clients_enrolled: int
    clients_sampled: int
    clients_reported: int
    server_time: float


class ClientInfo(BaseModel):
    """One client of a run; ``status``: training, reported, live, silent, revoked or declined."""

    name: str
    status: str
    enrolled_at: float
    last_seen: float
    rounds_joined: int
    rounds_reported: int
    samples: int
    bytes_up: int
    bytes_down: int
    last_train_loss: float | None
    rotation_distance: float | None = Field(
        description="mean ||R - I||_F over modules of the client's last aligned update"
    )
    rotation_distance_max: float | None
    rotation_round: int | None
    last_upload_refused: bool
    refusal_reason: str | None
    refusal_detail: str | None
    last_upload_interrupted: bool = Field(
        description="the last upload broke off; the server holds its bytes for a resume"
    )
    interruption_detail: str | None
    info: dict[str, str]
    declined: str | None = Field(
        None, description="why the client declined the run (DeclineRun); None: it did not"
    )
    phase: str | None = Field(
        None, description="the phase of the open round its latest heartbeat reported "
        "(downloading, training, uploading, withdrawn); None: no heartbeat about it",
    )  # fmt: skip
    progress: float | None = Field(None, description="fraction of that phase done, in [0, 1]")
    progress_at: float | None = Field(None, description="when that heartbeat came (unix time)")


class RoundInfo(BaseModel):
    """One round: its timing, who took part, and its closing figures."""

    round: int
    phase: str
    opened_at: float
    closed_at: float | None
    deadline: float
    participants: list[str]
    reporters: list[str]
    samples: int
    train_loss: float | None
    accuracy: float | None = Field(description="held-out accuracy (classification)")
    exact_match: float | None = Field(
        description="held-out exact match in [0, 1] (instruction tuning: greedy generation, "
        "answers compared after extraction)"
    )
    perplexity: float | None = Field(description="held-out completion-only perplexity (causal LM)")
    evaluation: dict[str, float] = Field(
        description="every held-out metric the server's evaluator reported after the round"
    )
    aggregation_error: float | None
    relative_aggregation_error: float | None
    fedit_aggregation_error: float | None = Field(
        None, description="what FedIT's error would have been for the same uploads (if reported)"
    )
    fedit_relative_aggregation_error: float | None = None
    rotation_drift_share: float | None = Field(
        None, description="share in [0, 1] of the clients' factor drift the rotation removed"
    )
    evaluating: bool = Field(False, description="its held-out evaluation is still running")
    bytes_in: int
    bytes_out: int
    duration_s: float | None
    extensions: int
    adapter_sha256: str | None


class ModuleInfo(BaseModel):
    """One LoRA module's aggregation error and mean rotation size in a round."""

    module: str
    aggregation_error: float | None
    relative_aggregation_error: float | None
    update_norm: float | None
    rotation_distance: float | None = Field(description="mean ||R - I||_F over the clients")


class RoundModules(BaseModel):
    round: int | None = Field(
        description="the round shown: the one asked for, else the latest closed round with a "
        "report (None: none)"
    )
    aligned: str | None
    modules: list[ModuleInfo]


class AdapterInfo(BaseModel):
    """A global adapter: ``round`` None is the initial one (what round 0 starts from)."""

    name: str = Field(description="'initial' or the round whose output it is")
    round: int | None
    sha256: str
    size_bytes: int
    zip_url: str
    safetensors_url: str


class ActionResult(BaseModel):
    run_id: str
    action: str
    detail: str


class Health(BaseModel):
    status: str
    runs: int


class SessionInfo(BaseModel):
    """What this browser may do: read (open, or signed in) and whether admin is set up."""

    read_token_required: bool
    can_read: bool
    admin_enabled: bool = Field(description="an admin token is configured")
