"""Scoring each round's global adapter on the held-out data, off the rounds' critical path.

Round t's adapter is evaluated on a thread of its own (with its own torch thread count) while
round t + 1 trains: the engine hands the adapter over when the round closes
(:meth:`RoundEvaluations.submit`) and records the scores when they come back. Evaluations run one
at a time, in round order. One that fails is logged and recorded as no metrics: a bad held-out
set never fails the run. The run ends after its last evaluation (:meth:`RoundEvaluations.drain`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from fedrot.adapters import Adapter
from fedrot_server.runs.spec import Evaluator
from fedrot_server.runs.worker import tensor_thread

logger = logging.getLogger(__name__)

Scores = dict[str, float]
Recorder = Callable[[Scores, float], Awaitable[None]]
"""Records one round's scores and the seconds the evaluation took."""


class RoundEvaluations:
    """Evaluations of closed rounds' adapters, one at a time on a dedicated thread."""

    def __init__(self, evaluator: Evaluator, *, threads: int | None = None) -> None:
        self._evaluator = evaluator
        self._thread = tensor_thread("fedrot-evaluation", threads)
        self._pending: dict[int, asyncio.Task[None]] = {}

    def submit(self, round_index: int, adapter: Adapter, record: Recorder) -> None:
        """Evaluate ``adapter`` (round ``round_index``'s) and ``record`` the scores, in the
        background; returns at once."""
        task = asyncio.create_task(self._evaluate(round_index, adapter, record),
                                   name=f"fedrot-evaluate-round-{round_index}")  # fmt: skip
        self._pending[round_index] = task
        task.add_done_callback(lambda _: self._pending.pop(round_index, None))

    @property
    def pending(self) -> list[int]:
        """The rounds whose evaluation has not been recorded yet."""
        return sorted(self._pending)

    async def drain(self) -> None:
        """Wait until every submitted evaluation is recorded."""
        while self._pending:
            await asyncio.gather(*self._pending.values())

    async def close(self) -> None:
        """Stop waiting for evaluations in flight (their rounds stay without metrics) and let
        the thread go once its current one ends."""
        for task in list(self._pending.values()):
            task.cancel()
        await asyncio.gather(*self._pending.values(), return_exceptions=True)
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def _evaluate(self, round_index: int, adapter: Adapter, record: Recorder) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            metrics = await loop.run_in_executor(self._thread, self._evaluator, adapter)
            scores = {str(k): float(v) for k, v in metrics.items()}
        except Exception as exc:  # noqa: BLE001 - a bad held-out set must not fail the run
            logger.error("evaluation of round %s's adapter failed, recorded without metrics: "
                         "%s: %s", round_index, type(exc).__name__, exc)  # fmt: skip
            scores = {}
        await record(scores, time.perf_counter() - started)
