"""The ``fedrot`` command: ``fedrot aggregate ...`` (see :mod:`fedrot.cli.aggregate`),
``fedrot simulate ...`` (:mod:`fedrot.cli.simulate`), ``fedrot split ...``
(:mod:`fedrot.cli.split`) and ``fedrot run submit|list|stop`` (:mod:`fedrot.cli.runs`, a
standing server's runs over its admin API).

The one corner of the ``fedrot`` package that reads and writes files. Bad input ends the
command with one line on stderr, ``fedrot: error: <file>: <problem>``, and exit status 2
(argparse's own errors included); never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from fedrot.cli import aggregate, runs, simulate, split
from fedrot.cli.files import InputError

PROG = "fedrot"
USAGE_ERROR = 2
INTERNAL_ERROR = 1

logger = logging.getLogger(__name__)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``fedrot: error: ...`` line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{PROG}: error: {_one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = OneLineParser(prog=PROG, description="FedRot-LoRA: federated LoRA aggregation tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    aggregate.add_parser(commands)
    simulate.add_parser(commands)
    split.add_parser(commands)
    runs.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 1 internal error, 2 bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args))
    except InputError as exc:
        return _fail(USAGE_ERROR, str(exc))
    except KeyboardInterrupt:
        return _fail(130, "interrupted")
    except Exception as exc:  # noqa: BLE001 - the contract: one line, never a traceback
        logger.debug("internal error", exc_info=True)
        return _fail(INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}")


def _fail(status: int, message: str) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return status


def _one_line(message: str) -> str:
    return message.strip().replace("\r", "\\r").replace("\n", "\\n")
