"""``create_app``: the dashboard as a FastAPI application over a read-only state.

Pages: ``/`` (one page, plain JS polling the API), ``/static/*`` (its script, style and the
plotly.js bundle shipped in the ``plotly`` wheel: no CDN). Machine endpoints: ``/api/v1/...``
(JSON, OpenAPI at ``/api/v1/openapi.json``, browsable at ``/api/v1/docs`` with no CDN),
``/healthz`` and ``/metrics`` (Prometheus); ``/favicon.ico``.
Never imports torch: it reads SQLite rows and JSON reports and serves files as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from fedrot_server.runs.control import RunControl, RunQueue
from fedrot_server.dashboard import api, run_submissions, session
from fedrot_server.dashboard.errors import install_handlers
from fedrot_server.dashboard.files import RunFiles
from fedrot_server.dashboard.metrics import build_registry, metrics_text
from fedrot_server.dashboard.schemas import Health
from fedrot_server.dashboard.security import Guard
from fedrot_server.dashboard.sources import Sources
from fedrot_server.storage.state import StateReader
from fedrot_server.storage.telemetry import TelemetryView

STATIC = Path(str(resources.files("fedrot_server.dashboard") / "static"))
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def plotly_bundle() -> Path:
    """``plotly.min.js`` from the installed ``plotly`` package (no network at run time)."""
    path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    if not path.is_file():
        raise FileNotFoundError(f"plotly.js bundle missing at {path} (is plotly installed?)")
    return path


def create_app(
    reader: StateReader,
    *,
    runs_root: Path,
    telemetry: TelemetryView | None = None,
    control: RunControl | None = None,
    runs: RunQueue | None = None,
    admin_token: str | None = None,
    read_token: str | None = None,
    client_timeout_s: float = 120.0,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The dashboard over ``reader`` (and ``telemetry``), serving adapters from ``runs_root``
    (``<state_dir>/runs``); admin actions go to ``control`` (None: refused with 409), run
    submissions to ``runs`` (a standing server's queue; None: refused with 409)."""
    app = FastAPI(title="FedRot dashboard", version="1", openapi_url=f"{api.PREFIX}/openapi.json",
                  docs_url=None, redoc_url=None)  # fmt: skip
    app.state.sources = Sources(reader, RunFiles(runs_root), telemetry, control,
                                client_timeout_s=client_timeout_s, clock=clock)  # fmt: skip
    app.state.guard = Guard.of(read_token, admin_token)
    app.state.runs = runs
    install_handlers(app)
    app.include_router(api.reads)
    app.include_router(api.actions)
    app.include_router(run_submissions.router)
    app.include_router(session.router)
    add_pages(app)
    add_operations(app, build_registry(app.state.sources))
    return app


def add_pages(app: FastAPI) -> None:
    bundle = plotly_bundle()

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get(f"{api.PREFIX}/docs", include_in_schema=False)
    def api_docs() -> FileResponse:
        """The OpenAPI schema as a page (rendered by ``static/apidocs.js``, no CDN)."""
        return FileResponse(STATIC / "apidocs.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.ico", media_type="image/x-icon",
                            headers={"Cache-Control": "max-age=86400"})  # fmt: skip

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_js() -> FileResponse:
        return FileResponse(bundle, media_type="text/javascript",
                            headers={"Cache-Control": "max-age=86400"})  # fmt: skip

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def add_operations(app: FastAPI, registry) -> None:  # noqa: ANN001 - CollectorRegistry
    @app.get("/healthz", response_model=Health, tags=["operations"])
    def healthz(request: Request) -> Health:
        """Liveness: the state can be read."""
        return Health(status="ok", runs=len(request.app.state.sources.runs()))

    @app.get("/metrics", tags=["operations"], response_class=Response,
             dependencies=[Depends(api.require_read)])  # fmt: skip
    def metrics() -> Response:
        """Prometheus text format: rounds, clients, bytes, errors, held-out metrics, refusals,
        round durations."""
        return Response(metrics_text(registry), media_type=PROMETHEUS_TEXT)
