"""Following a standing server from run to run: one :class:`Federation` per run.

A standing server serves run after run. When a run ends its DONE says ``server_continues``;
:func:`follow_runs` then hands out a fresh federation for the next run (entering it enrols,
waiting while the server has no run for this client). A run the client declined
(:meth:`Federation.decline`) is followed by the next one too: a standing server answers the new
enrolment with ``wait`` until another run starts, while a single-run server (which has no
other run) offers the declined run again, and the iteration then raises
:class:`~fedrot_client.errors.RunDeclinedError`. A run that ends the server (DONE without
``server_continues``), a stop, or ``one_run`` ends the iteration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from fedrot_client.enrolment import PastRuns
from fedrot_client.errors import RunChangedError, RunDeclinedError, UsageError
from fedrot_client.federation import Federation

logger = logging.getLogger(__name__)

MAX_RUN_CHANGES = 5

OpenFederation = Callable[[PastRuns], Federation]


def follow_runs(open_federation: OpenFederation, *, one_run: bool = False) -> Iterator[Federation]:
    """Federations, one per run, each to be used in its own ``with`` block before the next is
    asked for. ``open_federation(past)`` makes one (not entered), told which runs this client
    declined or finished (:class:`PastRuns`), so that an offer of one of them again is refused
    or waited out.
    ``one_run``: end after the first run (a declined one raises ``RunDeclinedError``)."""
    declined: dict[str, str] = {}
    finished: set[str] = set()
    changes = 0
    while True:
        federation = open_federation(PastRuns(dict(declined), frozenset(finished)))
        yield federation
        if not federation.entered:
            raise UsageError("use each federation of runs() in a `with` block before asking "
                             "for the next")  # fmt: skip
        if federation.stopped:
            return
        if federation.run_changed:  # the server restarted mid-run with another run
            changes += 1
            if changes > MAX_RUN_CHANGES:
                raise RunChangedError(f"the server changed its run's configuration {changes} "
                                      "times in a row; giving up")  # fmt: skip
            continue
        changes = 0
        run_id = federation.run.run_id
        if federation.declined is not None:
            if one_run or federation.declined_unheard:
                raise RunDeclinedError(f"declined run {run_id}: {federation.declined}", run_id)
            declined[run_id] = federation.declined
            continue
        if not federation.finished:
            raise UsageError(f"run {run_id} was left before it ended: go through fed.tasks() to "
                             "the end, fed.decline(reason) to skip a run, or break out of the "
                             "loop to leave")  # fmt: skip
        if one_run or not federation.server_continues:
            return
        finished.add(run_id)
        logger.info("run %s is over; the server continues: waiting for the next run", run_id)
