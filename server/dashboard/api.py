"""The versioned JSON API, ``/api/v1``: runs, overview, clients, rounds, modules, adapters
(info and downloads) and the admin actions. ``{run_id}`` may be ``current``.

Reads are plain ``def`` handlers (FastAPI runs them on its thread pool, off the server's event
loop); admin actions are coroutines on the loop, where the round engine lives.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from fedrot_server.dashboard import views
from fedrot_server.dashboard.errors import ApiError, not_found
from fedrot_server.dashboard.files import AdapterFiles
from fedrot_server.dashboard.schemas import (
    ActionResult,
    AdapterInfo,
    ClientInfo,
    ErrorBody,
    Overview,
    RoundInfo,
    RoundModules,
    RunInfo,
)
from fedrot_server.dashboard.security import Guard
from fedrot_server.dashboard.sources import Sources
from fedrot_server.storage.state import RoundPhase

PREFIX = "/api/v1"
ERRORS = {code: {"model": ErrorBody} for code in (401, 403, 404, 409, 422)}
INITIAL, LATEST = "initial", "latest"
ROUND_NUMBER = re.compile(r"[0-9]{1,9}")  # ASCII digits only (str.isdigit takes "²" and "٣")


def sources_of(request: Request) -> Sources:
    return request.app.state.sources


def guard_of(request: Request) -> Guard:
    return request.app.state.guard


def require_read(request: Request) -> None:
    guard_of(request).check_read(request, sources_of(request).clock())


def require_admin(request: Request) -> None:
    guard_of(request).check_admin(request)


SourcesDep = Annotated[Sources, Depends(sources_of)]
reads = APIRouter(prefix=PREFIX, dependencies=[Depends(require_read)], responses=ERRORS)
actions = APIRouter(prefix=PREFIX, dependencies=[Depends(require_admin)], responses=ERRORS,
                    tags=["admin"])  # fmt: skip


@reads.get("/runs", response_model=list[RunInfo], tags=["runs"])
def list_runs(sources: SourcesDep) -> list[RunInfo]:
    """Every recorded run, oldest first, with its strategy and best held-out figure."""
    return [views.run_info(run, rounds) for run, rounds in sources.runs_with_rounds()]


@reads.get("/runs/{run_id}", response_model=Overview, tags=["runs"])
def get_overview(run_id: str, sources: SourcesDep) -> Overview:
    state = sources.state(run_id)
    return views.overview(state, sources.live(state.run.run_id), sources.clock())


@reads.get("/runs/{run_id}/clients", response_model=list[ClientInfo], tags=["clients"])
def list_clients(run_id: str, sources: SourcesDep) -> list[ClientInfo]:
    state = sources.state(run_id)
    down: dict[str, int] = {}
    for row in sources.downloads(state.run.run_id):
        down[row.client] = down.get(row.client, 0) + row.size_bytes
    run_id = state.run.run_id
    events = views.UploadEvents(sources.refusals(run_id), sources.interruptions(run_id))
    return views.clients_view(state, sources.files, events, down, now=sources.clock(),
                              timeout_s=sources.client_timeout_s,
                              live=sources.live(run_id))  # fmt: skip


@reads.get("/runs/{run_id}/rounds", response_model=list[RoundInfo], tags=["rounds"])
def list_rounds(run_id: str, sources: SourcesDep) -> list[RoundInfo]:
    return views.rounds_view(sources.state(run_id))


@reads.get("/runs/{run_id}/rounds/{round_index}", response_model=RoundInfo, tags=["rounds"])
def get_round(run_id: str, round_index: int, sources: SourcesDep) -> RoundInfo:
    state = sources.state(run_id)
    for row in state.rounds:
        if row.round_index == round_index:
            return views.round_info(row, state.uploads.get(round_index, []))
    raise not_found(f"run {state.run.run_id} has no round {round_index}")


@reads.get("/runs/{run_id}/modules", response_model=RoundModules, tags=["rounds"])
def get_modules(run_id: str, sources: SourcesDep, round: int | None = None) -> RoundModules:
    """Per-module aggregation error and rotation size of ``round`` (an index from 0; default:
    the latest closed round with a report). A closed round without a report: no modules."""
    state = sources.state(run_id)
    if round is not None and all(r.round_index != round for r in state.rounds):
        raise not_found(f"run {state.run.run_id} has no round {round}")
    return views.modules_view(state, sources.files, round)


@reads.get("/runs/{run_id}/adapters", response_model=list[AdapterInfo], tags=["adapters"])
def list_adapters(run_id: str, sources: SourcesDep) -> list[AdapterInfo]:
    """The initial adapter and each closed round's output, oldest first."""
    state = sources.state(run_id)
    found = [(None, sources.files.adapter(state.run.run_id, None))]
    found += [(r.round_index, sources.files.adapter(state.run.run_id, r.round_index))
              for r in state.rounds if r.phase is RoundPhase.CLOSED]  # fmt: skip
    return [adapter_info(state.run.run_id, t, f) for t, f in found if f is not None]


@reads.get("/runs/{run_id}/adapters/{which}", response_model=AdapterInfo, tags=["adapters"])
def get_adapter(run_id: str, which: str, sources: SourcesDep) -> AdapterInfo:
    """``which``: ``latest``, ``initial`` or a round index (that round's output)."""
    run_id, round_index, files = find_adapter(sources, run_id, which)
    return adapter_info(run_id, round_index, files)


@reads.get("/runs/{run_id}/adapters/{which}/safetensors", response_class=FileResponse,
           tags=["adapters"])  # fmt: skip
@reads.head("/runs/{run_id}/adapters/{which}/safetensors", response_class=FileResponse,
            tags=["adapters"], operation_id="head_weights")  # fmt: skip
def download_weights(run_id: str, which: str, sources: SourcesDep) -> FileResponse:
    """The raw safetensors weights; its sha256 is in the ``X-Content-SHA256`` header (HEAD:
    the headers alone)."""
    run_id, round_index, files = find_adapter(sources, run_id, which)
    return FileResponse(files.weights, media_type="application/octet-stream",
                        filename=f"{run_id}-{adapter_name(round_index)}.safetensors",
                        headers={"X-Content-SHA256": files.sha256})  # fmt: skip


@reads.get("/runs/{run_id}/adapters/{which}/zip", response_class=FileResponse, tags=["adapters"])
@reads.head("/runs/{run_id}/adapters/{which}/zip", response_class=FileResponse, tags=["adapters"],
            operation_id="head_zip")  # fmt: skip
def download_zip(run_id: str, which: str, sources: SourcesDep) -> FileResponse:
    """A zip of the PEFT directory (``adapter_config.json`` + weights) under one folder."""
    run_id, round_index, files = find_adapter(sources, run_id, which)
    name = f"{run_id}-{adapter_name(round_index)}"
    return FileResponse(sources.zips.zip_of(files, name), media_type="application/zip",
                        filename=f"{name}.zip")  # fmt: skip


def adapter_name(round_index: int | None) -> str:
    return INITIAL if round_index is None else f"round-{round_index}"


def adapter_info(run_id: str, round_index: int | None, files: AdapterFiles) -> AdapterInfo:
    base = f"{PREFIX}/runs/{run_id}/adapters/{INITIAL if round_index is None else round_index}"
    return AdapterInfo(name=adapter_name(round_index), round=round_index, sha256=files.sha256,
                       size_bytes=files.size_bytes, zip_url=f"{base}/zip",
                       safetensors_url=f"{base}/safetensors")  # fmt: skip


def find_adapter(sources: Sources, run_id: str, which: str) -> tuple[str, int | None, AdapterFiles]:
    """``(run_id, round or None, files)`` of ``which``; 422 for a bad name, 404 when absent."""
    state = sources.state(run_id)
    run_id = state.run.run_id
    closed = [r.round_index for r in state.rounds if r.phase is RoundPhase.CLOSED]
    if which == LATEST:
        round_index = closed[-1] if closed else None
    elif which == INITIAL:
        round_index = None
    elif ROUND_NUMBER.fullmatch(which):
        round_index = int(which)
        if round_index not in closed:
            raise not_found(f"run {run_id} has no closed round {round_index}")
    else:
        raise ApiError(422, "invalid request",
                       f"adapter must be 'latest', 'initial' or a round number, got {which!r}")
    files = sources.files.adapter(run_id, round_index)
    if files is None:
        raise not_found(f"run {run_id}: no saved adapter for {adapter_name(round_index)}")
    return run_id, round_index, files


def _control(sources: Sources, run_id: str):  # noqa: ANN202 - RunControl
    """The run control of ``run_id``; 409 when this server does not run it now."""
    run = sources.run(run_id)
    if sources.control is None or sources.live(run.run_id) is None:
        raise ApiError(409, "not possible now", f"run {run.run_id} is not running on this server")
    return run.run_id, sources.control


@actions.post("/runs/{run_id}/pause", response_model=ActionResult)
async def pause(run_id: str, sources: SourcesDep) -> ActionResult:
    run_id, control = _control(sources, run_id)
    await control.pause()
    return ActionResult(run_id=run_id, action="pause", detail="no new round opens until resumed")


@actions.post("/runs/{run_id}/resume", response_model=ActionResult)
async def resume(run_id: str, sources: SourcesDep) -> ActionResult:
    run_id, control = _control(sources, run_id)
    await control.resume()
    return ActionResult(run_id=run_id, action="resume", detail="rounds open again")


@actions.post("/runs/{run_id}/close-round", response_model=ActionResult)
async def close_round(run_id: str, sources: SourcesDep) -> ActionResult:
    run_id, control = _control(sources, run_id)
    index = await control.close_round()
    return ActionResult(run_id=run_id, action="close-round",
                        detail=f"round {index} closes with the updates received")  # fmt: skip


@actions.post("/runs/{run_id}/clients/{client}/revoke", response_model=ActionResult)
async def revoke(run_id: str, client: str, sources: SourcesDep) -> ActionResult:
    run_id, control = _control(sources, run_id)
    await control.revoke(client)
    return ActionResult(run_id=run_id, action="revoke", detail=f"client {client!r} is revoked")
