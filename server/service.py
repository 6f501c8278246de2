"""Assemble a running server: settings -> store -> runs (each: spec -> worker -> engine) ->
gRPC and the dashboard.

:func:`start_server` is what ``fedrot-server`` and the tests call; the model seams
(``initializer``, ``evaluator``) are parameters, so tests run on tiny synthetic adapters.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from fedrot_proto.v1 import federation_pb2, federation_pb2_grpc
from fedrot_server.rpc.auth import TokenAuthenticator
from fedrot_server.checks import parse_listen
from fedrot_server.errors import SettingsError
from fedrot_server.runs.hosted_runs import EvaluatorFactory, RunSeams
from fedrot_server.runs.hosted_runs import check_initial as check_initial  # re-exported
from fedrot_server.runs.rounds import RoundEngine
from fedrot_server.runs.run_manager import RunManager
from fedrot_server.rpc.servicer import FederationServicer
from fedrot_server.settings import MAX_CHUNK_BYTES, ServerSettings
from fedrot_server.runs.spec import Evaluator, Initializer, RunSpec
from fedrot_server.storage.state_lock import StateDirLock
from fedrot_server.storage.store import SqliteStore, TokenChanges, open_reader
from fedrot_server.storage.telemetry import TelemetryLog, open_telemetry_reader
from fedrot_server.rpc.tls import add_port, security_of, server_credentials
from fedrot_server.runs.worker import ThreadedWorker, resolve_device

if TYPE_CHECKING:
    from fedrot_server.dashboard.serving import DashboardServer

logger = logging.getLogger(__name__)

SERVICE_NAME = federation_pb2.DESCRIPTOR.services_by_name["FederationService"].full_name
# A chunk of up to 4 MiB plus the few bytes of its message around it.
MESSAGE_LIMIT = MAX_CHUNK_BYTES + 64 * 1024
GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
)
# gRPC binds with SO_REUSEPORT by default: a second server on a taken port would bind too and
# split the clients with the first. Off, it fails its start instead.
SERVER_OPTIONS = (*GRPC_OPTIONS, ("grpc.so_reuseport", 0))


@dataclass
class FederationServer:
    """A started server: ``port`` is the bound port (useful with ``listen = host:0``);
    ``runs`` hosts its runs (``engine``, ``spec`` and ``worker`` are the active run's)."""

    settings: ServerSettings
    store: SqliteStore
    runs: RunManager
    grpc_server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    telemetry: TelemetryLog | None = None
    dashboard: DashboardServer | None = None
    lock: StateDirLock | None = None

    @property
    def engine(self) -> RoundEngine:
        return self.runs.active_engine()

    @property
    def spec(self) -> RunSpec:
        return self.engine.spec

    @property
    def worker(self) -> ThreadedWorker:
        assert self.runs.active is not None, "no run is active"
        return self.runs.active.worker

    @property
    def dashboard_port(self) -> int | None:
        """The dashboard's bound port (None: no dashboard)."""
        return None if self.dashboard is None else self.dashboard.port

    @property
    def address(self) -> str:
        host = self.settings.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop serving (in-flight calls get ``grace_s``), the dashboard, the rounds, the
        worker, the store; the state folder's lock last, whatever failed before."""
        try:
            if self.dashboard is not None:
                await self.dashboard.stop()
            await self.health.enter_graceful_shutdown()
            await self.runs.stop()
            await self.grpc_server.stop(grace_s)
            await self.runs.close()
            self.store.close()
            if self.telemetry is not None:
                self.telemetry.close()
        finally:
            if self.lock is not None:
                self.lock.release()


async def start_server(
    settings: ServerSettings,
    *,
    initializer: Initializer,
    evaluator: Evaluator | None = None,
    evaluator_for: EvaluatorFactory | None = None,
    run_id: str | None = None,
) -> FederationServer:
    """Build everything, bind ``settings.listen``, start serving and start the run (or resume
    the unfinished run a crash left in ``state_dir``, see :mod:`fedrot_server.runs.recovery`); a
    standing server (``settings.standing``) starts with no run, or its unfinished one, and
    takes submitted runs. Every run is evaluated by ``evaluator``, or by the one
    ``evaluator_for`` builds for it. SettingsError when another server holds ``state_dir``."""
    lock = StateDirLock(settings.state_dir)
    seams = (RunSeams(initializer, evaluator_for) if evaluator_for is not None
             else RunSeams.fixed(initializer, evaluator))  # fmt: skip
    try:
        server = await _start_holding(settings, seams, run_id)
    except BaseException:
        lock.release()
        raise
    server.lock = lock
    return server


def log_token_changes(changes: TokenChanges) -> None:
    """One line per kind of change the tokens source made to the enrolled clients."""
    if changes.added:
        logger.info("clients added: %s", ", ".join(changes.added))
    if changes.rekeyed:
        logger.info("clients with a new token: %s", ", ".join(changes.rekeyed))
    if changes.revoked:
        logger.warning("clients revoked (no longer in the tokens): %s", ", ".join(changes.revoked))
    if changes.restored:
        logger.warning("clients restored (back in the tokens): %s", ", ".join(changes.restored))


async def _start_holding(
    settings: ServerSettings, seams: RunSeams, run_id: str | None
) -> FederationServer:
    device = resolve_device(settings.device)
    credentials = server_credentials(settings)
    store = SqliteStore(settings.database_path)
    log_token_changes(store.sync_client_tokens(settings.client_tokens()))
    runs = RunManager(settings, store=store, seams=seams, device=device)
    try:
        return await _serve_runs(settings, store, runs, credentials, run_id)
    except BaseException:  # a failed or cancelled start: nothing is left running or open
        await runs.stop()
        await runs.close()
        store.close()
        raise


async def _serve_runs(
    settings: ServerSettings,
    store: SqliteStore,
    runs: RunManager,
    credentials: grpc.ServerCredentials | None,
    run_id: str | None,
) -> FederationServer:
    await runs.prepare(run_id)
    async with contextlib.AsyncExitStack() as opened:  # closed again if the start fails
        telemetry = TelemetryLog(settings.database_path)
        opened.callback(telemetry.close)
        # First of the listeners: a taken dashboard port fails the start before anything serves.
        dashboard = await serve_dashboard(settings, runs) if settings.dashboard_listen else None
        if dashboard is not None:
            opened.push_async_callback(dashboard.stop)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        federation_pb2_grpc.add_FederationServiceServicer_to_server(
            FederationServicer(runs, TokenAuthenticator(store), telemetry), server
        )
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = add_port(server, settings.listen, credentials)
        await runs.start()  # a resumed round is rebuilt before any client can reach it
        opened.push_async_callback(server.stop, 0)
        await server.start()
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        opened.pop_all()
    logger.info("serving %s on port %s, %s (device %s, state %s%s)", SERVICE_NAME, port,
                security_of(settings), runs.device, settings.state_dir,
                ", standing: taking submitted runs" if settings.standing else "")  # fmt: skip
    return FederationServer(settings, store, runs, server, health, port, telemetry, dashboard)


async def serve_dashboard(settings: ServerSettings, runs: RunManager) -> DashboardServer:
    """Start the web dashboard on ``settings.dashboard_listen`` over read-only views of the
    state, with ``runs`` as its run control and run queue."""
    try:  # the dashboard's packages come with the server extra
        from fedrot_server.dashboard import create_app
        from fedrot_server.dashboard.serving import start_dashboard
    except ModuleNotFoundError as exc:
        raise SettingsError(
            f"dashboard_listen = {settings.dashboard_listen!r} needs {exc.name}: install the "
            "server extra (pip install 'fedrot[server]'), or set dashboard_listen = '' to "
            "serve without the dashboard"
        ) from None
    host, port = parse_listen(settings.dashboard_listen)
    reader, telemetry = open_reader(settings.database_path), open_telemetry_reader(settings.database_path)
    app = create_app(reader, telemetry=telemetry, control=runs, runs=runs,
                     runs_root=settings.state_dir / "runs", admin_token=settings.admin_token,
                     read_token=settings.dashboard_read_token,
                     client_timeout_s=settings.client_timeout_s)  # fmt: skip
    try:
        return await start_dashboard(app, host, port, resources=(reader, telemetry))
    except BaseException:
        reader.close()
        telemetry.close()
        raise
