"""``fedrot-client``: the client daemon's entry point (settings, logging, signals, exit codes).

Exit status: 0 when the server's last run ended (or the one run of ``--one-run``) or the
daemon was stopped by SIGTERM/SIGINT; 2 for bad settings, data, a base model that differs from
the run's, or a run declined because the data does not fit it (another task or other label
names) when the server has no other run for this client or ``--one-run`` is set: the one line
naming the first difference is logged; 1 when the server refused us (a bad token) or stayed
away past ``--reconnect-timeout-s``.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence

from fedrot.errors import FedRotError
from fedrot_client.daemon import ClientDaemon
from fedrot_client.errors import (
    DataError,
    ModelError,
    RejectedError,
    RunDeclinedError,
    ServerUnavailableError,
    StateError,
)
from fedrot_client.connection import open_transport
from fedrot_client.settings import ClientSettings, SettingsError, load_settings
from fedrot_client.signals import StopSignals

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED_TO_START = 2


def run(settings: ClientSettings) -> int:
    """Run the daemon to its end; returns the exit status."""
    stop = threading.Event()
    try:
        transport = open_transport(settings, stop)
    except (SettingsError, OSError) as exc:
        logger.error("refusing to start: %s", exc)
        return EXIT_REFUSED_TO_START
    signals = StopSignals(stop, transport)
    signals.install()
    try:
        ClientDaemon(settings, transport, stop=stop).run()
    except RunDeclinedError as exc:
        logger.error("%s", exc)
        return EXIT_REFUSED_TO_START
    except (ModelError, DataError, SettingsError) as exc:
        logger.error("refusing to start: %s", exc)
        return EXIT_REFUSED_TO_START
    except StateError as exc:
        logger.error("%s", exc)
        return EXIT_REFUSED_TO_START
    except (RejectedError, ServerUnavailableError) as exc:
        logger.error("%s", exc)
        return EXIT_FAILED
    except FedRotError as exc:
        logger.error("failed: %s", exc)
        return EXIT_FAILED
    finally:
        stop.set()
        transport.close()
        signals.restore()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fedrot-client`` command."""
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except SettingsError as exc:
        print(f"fedrot-client: {exc}", file=sys.stderr)
        return EXIT_REFUSED_TO_START
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run(settings)


if __name__ == "__main__":
    raise SystemExit(main())
