"""Submitting and stopping runs on a standing server (admin token): ``POST /api/v1/runs`` and
``POST /api/v1/runs/{run_id}/stop``. Listing them is the read route ``GET /api/v1/runs``.

A submission's body is a JSON object of the run's settings under the server's run-setting names
(``rounds``, ``model``, ``lora``, ``strategy``, ``training``, ``evaluation``, ``clients``,
``min_clients``, ``clients_per_round``, ``quorum``, ``round_deadline_s``, ``seed``,
``late_updates``, ``staleness_weight``); what it leaves out takes the default. Runs start in
submission order, one at a time. The settings are validated by the server behind
:class:`~fedrot_server.runs.control.RunQueue` (the dashboard never imports the engine).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, Field

from fedrot_server.runs.control import RunQueue
from fedrot_server.dashboard.api import ERRORS, PREFIX, SourcesDep, require_admin
from fedrot_server.dashboard.errors import ApiError
from fedrot_server.dashboard.schemas import ActionResult
from fedrot_server.errors import RunSettingsError
from fedrot_server.storage.state import RunPhase

router = APIRouter(prefix=PREFIX, dependencies=[Depends(require_admin)], responses=ERRORS,
                   tags=["admin", "runs"])  # fmt: skip


class SubmittedRun(BaseModel):
    run_id: str
    phase: str = Field(description="queued: it starts when the runs before it ended")
    queue_position: int | None = Field(description="1: the next to start")


def queue_of(request: Request) -> RunQueue:
    """The server's run queue; 409 when this server takes no submitted runs."""
    queue = getattr(request.app.state, "runs", None)
    if queue is None:
        raise ApiError(409, "not possible now", "this dashboard has no server taking runs")
    return queue


QueueDep = Annotated[RunQueue, Depends(queue_of)]


@router.post("/runs", status_code=201, response_model=SubmittedRun)
async def submit_run(
    settings: Annotated[dict[str, Any], Body(description="the run's settings")],
    queue: QueueDep,
    sources: SourcesDep,
) -> SubmittedRun:
    """Queue a run; 422 naming each bad setting, 409 on a server without ``--standing``."""
    try:
        run_id = queue.submit(settings)
    except RunSettingsError as exc:
        problems = [{"where": name, "problem": problem} for name, problem in exc.problems]
        raise ApiError(422, "invalid run settings", problems) from None
    run = sources.run(run_id)
    return SubmittedRun(run_id=run_id, phase=run.phase.value, queue_position=run.queue_position)


@router.post("/runs/{run_id}/stop", response_model=ActionResult)
async def stop_run(run_id: str, queue: QueueDep, sources: SourcesDep) -> ActionResult:
    """A queued run is cancelled (recorded stopped, with no round); the active one ends as
    stopped: its clients hear DONE and its last published adapter stays downloadable."""
    run_id = sources.run(run_id).run_id
    was = await queue.stop_run(run_id)
    detail = ("cancelled before it started" if was is RunPhase.QUEUED
              else "stopped: its clients hear DONE; its last adapter stays downloadable")  # fmt: skip
    return ActionResult(run_id=run_id, action="stop", detail=detail)
