"""The aggregation worker: every piece of tensor work of a round, off the event loop.

:class:`AggregationWorker` is the interface the round engine uses. :class:`ThreadedWorker`
implements it on one dedicated thread that owns the device (CUDA when present and allowed,
else CPU): each upload is decoded, validated against the run's schema, completed from the
reference (partial uploads), aligned and accumulated there, one at a time, as it arrives; the
gRPC event loop only awaits. Uploaded values above ``max_abs`` in magnitude (the
``max_upload_value`` setting) are refused with the finite-value checks. Results come back as
float32 CPU tensors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from fedrot.adapters import Adapter, AdapterSchema, Factor
from fedrot.aggregation import AggregationResult, RoundAggregator
from fedrot.codec import Buffer, decode_adapter, encode_adapter
from fedrot.diagnostics import ClientReport
from fedrot.errors import AggregationStateError
from fedrot.strategies import RoundPlan, Strategy
from fedrot_server.errors import SettingsError, WrongStateError
from fedrot_server.settings import DEFAULT_MAX_UPLOAD_VALUE
from fedrot_server.rpc.transfers import sha256_hex

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class EncodedAdapter:
    """An adapter as it goes on the wire and to disk: safetensors bytes and their SHA-256."""

    payload: bytes
    sha256: str

    @property
    def size(self) -> int:
        return len(self.payload)


@dataclass(frozen=True)
class CheckedUpdate:
    """An upload that decoded and passed the value checks: its float32 tensors (PEFT keys of
    the trained factors and the head), possibly views of the upload's file."""

    tensors: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class FinishedRound:
    """A finalised round: the result (float32 CPU tensors), the new global adapter encoded,
    and the seconds the worker spent finalising."""

    result: AggregationResult
    encoded: EncodedAdapter
    seconds: float


def tensor_thread(name: str, threads: int | None) -> ThreadPoolExecutor:
    """One dedicated thread for tensor work, with its own torch CPU thread count (``None``:
    torch's default). The count is per thread (OpenMP), so two such threads (aggregation and
    evaluation) share the CPUs as configured instead of each taking them all."""
    initializer = None if threads is None else (lambda: torch.set_num_threads(threads))
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=initializer)


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; ``"cuda"`` without CUDA is a settings error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingsError("device = 'cuda', but CUDA is not available on this machine")
    return torch.device(name)


class AggregationWorker(ABC):
    """Tensor work of the rounds. One round at a time: ``begin_round``, then per upload either
    ``add_update`` or ``check_update`` and ``queue_update`` (the engine's live path: the check
    before the acknowledgement, the aggregation after it), then ``finish_round``. Raises the
    core's CodecError/SchemaError for a bad upload, before anything is accumulated."""

    device: torch.device

    @abstractmethod
    async def encode(self, adapter: Adapter, metadata: Mapping[str, str]) -> EncodedAdapter:
        """The safetensors bytes of ``adapter`` (PEFT keys) with ``metadata`` in the header."""

    @abstractmethod
    async def begin_round(self, reference: Adapter, plan: RoundPlan) -> None:
        """Start aggregating a round whose clients start from ``reference``."""

    @abstractmethod
    async def add_update(self, client_id: str, payload: Buffer, weight: float) -> ClientReport:
        """Decode, validate, complete, align and accumulate one client's upload. A writable
        ``payload`` (the spool file's copy-on-write map) is decoded without a copy."""

    @abstractmethod
    async def check_update(self, payload: Buffer, trained: frozenset[Factor]) -> CheckedUpdate:
        """Decode and validate one upload of the ``trained`` factors, off the worker's thread
        (so it waits for no aggregation queued there): CodecError or SchemaError when it is
        bad. A writable ``payload`` is viewed, not copied."""

    @abstractmethod
    def queue_update(
        self, client_id: str, update: CheckedUpdate, weight: float
    ) -> asyncio.Future[ClientReport]:
        """Queue the completion, alignment and accumulation of a checked update on the
        worker's thread at once (before any call made after this one) and return its future."""

    @abstractmethod
    async def finish_round(self, metadata: Mapping[str, str]) -> FinishedRound:
        """Finalise the round; the new global adapter is encoded with ``metadata``."""

    @abstractmethod
    async def run(self, function: Callable[[], T]) -> T:
        """Run other tensor work (e.g. evaluation) on the worker's thread."""

    @abstractmethod
    async def close(self) -> None:
        """Stop the worker; pending work finishes first."""


class ThreadedWorker(AggregationWorker):
    """:class:`AggregationWorker` on one dedicated thread owning ``device``, with ``threads``
    torch CPU threads. A tracked round writes its clients' factors to an unlinked file in
    ``scratch`` until it finalises (the run's state folder: a disk, where the uploads are)."""

    def __init__(
        self,
        strategy: Strategy,
        schema: AdapterSchema,
        *,
        device: torch.device | str = "cpu",
        track_error: bool = True,
        max_abs: float = DEFAULT_MAX_UPLOAD_VALUE,
        threads: int | None = None,
        scratch: Path | None = None,
    ) -> None:
        self.device = torch.device(device)
        self._scratch = scratch
        self._strategy = strategy
        self._schema = schema
        self._track_error = track_error
        self._max_abs = max_abs
        self._executor = tensor_thread("fedrot-aggregation", threads)
        self._reference: Adapter | None = None
        self._plan: RoundPlan | None = None
        self._aggregator: RoundAggregator | None = None

    async def run(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    async def encode(self, adapter: Adapter, metadata: Mapping[str, str]) -> EncodedAdapter:
        return await self.run(lambda: _encode(adapter, metadata))

    async def begin_round(self, reference: Adapter, plan: RoundPlan) -> None:
        await self.run(lambda: self._begin(reference, plan))

    async def add_update(self, client_id: str, payload: Buffer, weight: float) -> ClientReport:
        return await self.run(lambda: self._add(client_id, payload, weight))

    async def check_update(self, payload: Buffer, trained: frozenset[Factor]) -> CheckedUpdate:
        return await asyncio.to_thread(self._check, payload, trained)

    def queue_update(
        self, client_id: str, update: CheckedUpdate, weight: float
    ) -> asyncio.Future[ClientReport]:
        work = self._executor.submit(self._add_checked, client_id, update, weight)
        return asyncio.wrap_future(work)

    async def finish_round(self, metadata: Mapping[str, str]) -> FinishedRound:
        return await self.run(lambda: self._finish(metadata))

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)

    # On the worker thread.

    def _begin(self, reference: Adapter, plan: RoundPlan) -> None:
        self._reference = _to_device(reference, torch.device("cpu"))
        self._plan = plan
        self._aggregator = self._strategy.start_round(
            _to_device(reference, self.device),
            plan,
            device=self.device,
            track_error=self._track_error,
            scratch=self._scratch,
        )

    def _add(self, client_id: str, payload: Buffer, weight: float) -> ClientReport:
        if self._plan is None:
            raise WrongStateError("no round is being aggregated")
        return self._add_checked(client_id, self._check(payload, self._plan.trained), weight)

    def _check(self, payload: Buffer, trained: frozenset[Factor]) -> CheckedUpdate:
        decoded = decode_adapter(payload, self._schema, trained, max_abs=self._max_abs)
        return CheckedUpdate({key: t.to(torch.float32) for key, t in decoded.tensors.items()})

    def _add_checked(self, client_id: str, update: CheckedUpdate, weight: float) -> ClientReport:
        if self._aggregator is None or self._reference is None:
            raise WrongStateError("no round is being aggregated")
        full = self._reference.with_factors_from(update.tensors)
        return self._aggregator.add(client_id, _to_device(full, self.device), weight)

    def _finish(self, metadata: Mapping[str, str]) -> FinishedRound:
        if self._aggregator is None:
            raise AggregationStateError("no round is being aggregated")
        started = time.perf_counter()
        raw = self._aggregator.finalize()
        self._aggregator = None
        result = AggregationResult(
            adapter=_to_device(raw.adapter, torch.device("cpu")),
            base_deltas={k: v.to("cpu", torch.float32) for k, v in raw.base_deltas.items()},
            report=raw.report,
        )
        encoded = _encode(result.adapter, metadata)
        return FinishedRound(result, encoded, time.perf_counter() - started)


def _encode(adapter: Adapter, metadata: Mapping[str, str]) -> EncodedAdapter:
    payload = encode_adapter(adapter.to_state_dict(), metadata)
    return EncodedAdapter(payload=payload, sha256=sha256_hex(payload))


def _to_device(adapter: Adapter, device: torch.device) -> Adapter:
    """``adapter`` with every tensor as float32 on ``device`` (no copy when already there)."""
    return Adapter.from_state_dict(
        {k: t.to(device=device, dtype=torch.float32) for k, t in adapter.to_state_dict().items()}
    )
