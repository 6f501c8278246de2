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


class RunInfo(BaseModel):
    run_id: str
    created_at: float
    phase: str = Field(description="waiting, running, finished or stopped (as recorded)")
    rounds_completed: int
    rounds_total: int | None
    finished_at: float | None


class Overview(BaseModel):
    """The run at a glance."""

    run: RunInfo
    base_model: str | None
    task: str | None
    strategy: str | None
    alignment_strength: float | None = Field(description="lambda: 0 = FedIT, 1 = hard alignment")
    lora_rank: int | None
    activity: str = Field(description="waiting, training, aggregating or done")
    paused: bool
    live: bool = Field(description="whether this dashboard's server runs this run now")
    current_round: int | None
    round_phase: str | None
    deadline: float | None
    seconds_left: float | None
    clients_enrolled: int
    clients_sampled: int
    clients_reported: int
    server_time: float


class ClientInfo(BaseModel):
    """One client of a run; ``status``: training, reported, live, silent or revoked."""

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
    round: int | None = Field(description="the latest closed round with a report (None: none)")
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
