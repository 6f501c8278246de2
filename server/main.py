"""``fedrot-server``: settings -> store -> runs -> gRPC server (with health).

Runs one federated run, keeps serving for ``linger_s`` after it ends (or until every client
was told DONE), then exits 0. With ``--standing`` it serves with no run and runs the runs
submitted over the admin API one after another, until SIGTERM. SIGTERM or SIGINT stops
gracefully (exit 0); a failed run or bad settings exit 1 or 2.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from fedrot_server.errors import SettingsError
from fedrot_server.runs.hosted_runs import EvaluatorFactory
from fedrot_server.service import FederationServer, start_server
from fedrot_server.run_settings import EvaluationSettings
from fedrot_server.settings import ServerSettings, load_settings
from fedrot_server.runs.spec import Evaluator, Initializer, RunSpec

logger = logging.getLogger("fedrot_server")


def default_seams(settings: ServerSettings) -> tuple[Initializer, Evaluator | None]:
    """The production initializer and (when ``evaluation.data`` is set) evaluator, whose
    held-out rows are read and checked here: a bad one is a :class:`SettingsError` before
    anything serves."""
    from fedrot_server.runs.base_models import HeldOutEvaluator, load_initial_model

    if settings.evaluation.data is None:
        return load_initial_model, None
    # The evaluator needs the model, LoRA and seed settings only, not the run id.
    return load_initial_model, HeldOutEvaluator(RunSpec.from_settings(settings), settings.evaluation)


def held_out_evaluator(spec: RunSpec, evaluation: EvaluationSettings) -> Evaluator | None:
    """A standing server's evaluator of one run (None when the run sets no
    ``evaluation.data``); its held-out rows are read and checked as the run starts."""
    from fedrot_server.runs.base_models import HeldOutEvaluator

    return None if evaluation.data is None else HeldOutEvaluator(spec, evaluation)


def standing_seams() -> tuple[Initializer, EvaluatorFactory]:
    """The production seams of a standing server: each run's evaluator is built for it."""
    from fedrot_server.runs.base_models import load_initial_model

    return load_initial_model, held_out_evaluator


async def serve(
    settings: ServerSettings,
    *,
    initializer: Initializer | None = None,
    evaluator: Evaluator | None = None,
    started: asyncio.Future[FederationServer] | None = None,
) -> int:
    """Run the server until the run ends (plus lingering) or a stop signal; the exit code.

    Without ``initializer`` the production seams are used (:func:`default_seams`);
    ``started`` receives the running server (its bound port) once it serves.
    """
    evaluator_for: EvaluatorFactory | None = None
    if initializer is None and settings.standing:
        initializer, evaluator_for = standing_seams()
    elif initializer is None:
        initializer, evaluator = default_seams(settings)
    server = await start_server(settings, initializer=initializer, evaluator=evaluator,
                                evaluator_for=evaluator_for)  # fmt: skip
    if started is not None:
        started.set_result(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A single-run server's run ending; a standing server's queue failing (it never ends).
    run = asyncio.ensure_future(server.runs.wait_ended())
    stopped = asyncio.ensure_future(stop.wait())
    code = 0
    try:
        await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if run.done() and run.exception() is not None:
            logger.error("the run failed: %s", run.exception())
            code = 1
        elif run.done():
            told = asyncio.ensure_future(server.engine.wait_all_told(settings.linger_s))
            await asyncio.wait({told, stopped}, return_when=asyncio.FIRST_COMPLETED)
            told.cancel()
            if not stopped.done():
                # Clients fetch the final adapter right after hearing DONE.
                await asyncio.wait({stopped}, timeout=settings.final_download_grace_s)
        else:
            logger.info("stop signal received: shutting down")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        stopped.cancel()
        run.cancel()
        await server.stop()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except SettingsError as exc:
        print(f"fedrot-server: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return asyncio.run(serve(settings))
    except SettingsError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
