"""A minimal client of ``fedrot.v1`` for the server tests (no fedrot_client, no transformers),
synthetic tiny adapters, and a server started in-process on 127.0.0.1:0.

Importable as ``wire`` from the tests in this folder (pytest puts the folder on sys.path).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import Tensor

from fedrot.adapters import Adapter, AdapterSchema, Factor, LoraPair
from fedrot.codec import decode_adapter, encode_adapter
from fedrot.strategies import StrategyConfig, build_strategy
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_proto.v1 import federation_pb2_grpc as pb_grpc
from fedrot_server.service import GRPC_OPTIONS, FederationServer, start_server
from fedrot_server.settings import ServerSettings
from fedrot_server.runs.spec import InitialModel, RunSpec

MIB = 1024 * 1024
PREFIX = "base_model.model.encoder"
HEAD = "base_model.model.classifier"
FACTOR_NUMBERS = {Factor.A: pb.FACTOR_A, Factor.B: pb.FACTOR_B}


def token_of(name: str) -> str:
    return f"token-{name}-0123456789abcdef"


def synthetic_adapter(
    rank: int = 2,
    modules: Mapping[str, tuple[int, int]] | None = None,
    head: tuple[int, int] = (3, 6),
    seed: int = 0,
) -> Adapter:
    """A PEFT-like initial adapter: A random, B zeros, a head ``weight (labels, hidden)`` and
    ``bias (labels,)``, float32. Default modules: two of ``(8, 6)``, one of ``(6, 6)``."""
    modules = modules or {f"{PREFIX}.0.query": (8, 6), f"{PREFIX}.0.value": (8, 6),
                          f"{PREFIX}.1.query": (6, 6)}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    lora = {
        m: LoraPair(A=torch.randn(rank, d_in, generator=g), B=torch.zeros(d_out, rank))
        for m, (d_out, d_in) in modules.items()
    }
    extra = {f"{HEAD}.weight": torch.randn(*head, generator=g), f"{HEAD}.bias": torch.zeros(head[0])}
    return Adapter(lora=lora, extra=extra)


def initializer_of(adapter: Adapter, fingerprint: str = "sha256:synthetic") -> Any:
    def initialize(spec: RunSpec) -> InitialModel:
        return InitialModel(adapter, fingerprint)

    return initialize


def local_update(
    reference: Adapter, trained: Iterable[Factor], *, seed: int, scale: float = 0.1
) -> dict[str, Tensor]:
    """A fake round of training: the reference plus seeded noise on the trained factors and the
    head; returns what a client uploads (trained factors and extras, PEFT keys)."""
    g = torch.Generator().manual_seed(seed)
    trained = frozenset(trained)
    out: dict[str, Tensor] = {}
    for module, pair in reference.lora.items():
        for which in sorted(trained):
            base = pair.factor(which)
            out[which.key(module)] = base + scale * torch.randn(base.shape, generator=g)
    for key, tensor in reference.extra.items():
        out[key] = tensor + scale * torch.randn(tensor.shape, generator=g)
    return out


def make_settings(tmp_path: Path, clients: Sequence[str], **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "dashboard_listen": "",  # no fixed port in tests; the dashboard tests turn it on
        "state_dir": tmp_path / "state",
        "tokens": {name: token_of(name) for name in clients},
        "lora": {"rank": 2, "alpha": 4.0, "target_modules": ["query", "value"]},
        "min_clients": len(clients),
        "rounds": 2,
        "round_deadline_s": 60.0,
        "max_task_wait_s": 5.0,
        "device": "cpu",
    }
    values.update(overrides)
    return ServerSettings(**values)


@asynccontextmanager
async def running_server(
    settings: ServerSettings, initial: Adapter, **kwargs: Any
) -> AsyncIterator[FederationServer]:
    server = await start_server(settings, initializer=initializer_of(initial), **kwargs)
    try:
        yield server
    finally:
        await server.stop(grace_s=0.5)


@dataclass
class WireClient:
    """One client's channel and token; thin wrappers over the generated stub."""

    address: str
    token: str | None
    run_id: str = ""
    channel: grpc.aio.Channel = field(init=False)
    stub: pb_grpc.FederationServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.address, options=GRPC_OPTIONS)
        self.stub = pb_grpc.FederationServiceStub(self.channel)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return () if self.token is None else (("authorization", f"Bearer {self.token}"),)

    async def close(self) -> None:
        await self.channel.close()

    async def enroll(self, **info: str) -> pb.EnrollResponse:
        response = await self.stub.Enroll(pb.EnrollRequest(info=info), metadata=self.metadata)
        self.run_id = response.run.run_id
        return response

    async def get_task(self, max_wait_s: float = 5.0) -> pb.GetTaskResponse:
        request = pb.GetTaskRequest(run_id=self.run_id)
        request.max_wait.FromNanoseconds(int(max_wait_s * 1e9))
        return await self.stub.GetTask(request, metadata=self.metadata)

    async def heartbeat(
        self, round_index: int, phase: int = pb.CLIENT_PHASE_TRAINING
    ) -> pb.HeartbeatResponse:
        request = pb.HeartbeatRequest(run_id=self.run_id, round=round_index, phase=phase,
                                      progress=0.5)  # fmt: skip
        return await self.stub.Heartbeat(request, metadata=self.metadata)

    async def download_parts(
        self, round_index: int, offset: int = 0
    ) -> tuple[pb.TransferHeader, list[pb.Chunk]]:
        request = pb.DownloadAdapterRequest(run_id=self.run_id, round=round_index, offset=offset)
        header, chunks = None, []
        async for message in self.stub.DownloadAdapter(request, metadata=self.metadata):
            if message.WhichOneof("part") == "header":
                header = message.header
            else:
                chunks.append(message.chunk)
        assert header is not None, "no header in the download"
        return header, chunks

    async def download(self, round_index: int) -> bytes:
        """The whole adapter of ``round_index``, checked against the header's size and sha."""
        header, chunks = await self.download_parts(round_index)
        payload = b"".join(c.data for c in chunks)
        assert [c.offset for c in chunks] == [sum(len(c.data) for c in chunks[:i])
                                               for i in range(len(chunks))]  # fmt: skip
        assert len(payload) == header.total_size
        assert hashlib.sha256(payload).hexdigest() == header.sha256
        return payload

    async def update_for(self, task: pb.TrainTask, seed: int) -> bytes:
        """An encoded update for ``task``: its global adapter, downloaded, moved by
        :func:`local_update` on the factors the task trains."""
        reference = adapter_of(await self.download(task.round))
        return encode_update(local_update(reference, trained_of(task), seed=seed))

    async def upload_messages(
        self, messages: Iterable[pb.UploadUpdateRequest]
    ) -> pb.UploadUpdateResponse:
        return await send_upload(self.stub, list(messages), self.metadata)

    async def upload(
        self,
        round_index: int,
        payload: bytes,
        factors: Iterable[Factor],
        *,
        sample_count: int = 10,
        metrics: Mapping[str, float] | None = None,
        key: str | None = None,
        chunk_bytes: int = MIB,
        **header_overrides: Any,
    ) -> pb.UploadUpdateResponse:
        header = upload_header(self.run_id, round_index, payload, factors,
                               sample_count=sample_count, metrics=metrics or {"train_loss": 1.0},
                               key=key, **header_overrides)  # fmt: skip
        return await self.upload_messages([header, *chunk_messages(payload, chunk_bytes)])


LATE_WRITE_ATTEMPTS = 5


async def send_upload(
    stub: pb_grpc.FederationServiceStub,
    messages: Sequence[pb.UploadUpdateRequest],
    metadata: Sequence[tuple[str, str]],
) -> pb.UploadUpdateResponse:
    """One UploadUpdate of ``messages``, as the test clients send it.

    grpc.aio's client can end a call that the server refused before reading every message with
    an INTERNAL of its own (``Failed "execute_batch"``: a message it was still writing), which
    hides the server's status. Such a call is sent again (a refused upload changes nothing),
    a few times at most; the real client's synchronous stub does not have this race.
    """

    async def stream() -> AsyncIterator[pb.UploadUpdateRequest]:
        for message in messages:
            yield message

    attempt = 1
    while True:
        try:
            return await stub.UploadUpdate(stream(), metadata=metadata)
        except grpc.aio.AioRpcError as error:
            late_write = (error.code() is grpc.StatusCode.INTERNAL
                          and "execute_batch" in (error.debug_error_string() or ""))  # fmt: skip
            if not late_write or attempt == LATE_WRITE_ATTEMPTS:
                raise
        attempt += 1


def upload_header(
    run_id: str,
    round_index: int,
    payload: bytes,
    trained: Iterable[Factor],
    *,
    sample_count: int,
    metrics: Mapping[str, float],
    key: str | None = None,
    **overrides: Any,
) -> pb.UploadUpdateRequest:
    fields: dict[str, Any] = {
        "run_id": run_id, "round": round_index, "sample_count": sample_count,
        "metrics": dict(metrics), "total_size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "idempotency_key": key or uuid.uuid4().hex,
        "factors": [FACTOR_NUMBERS[f] for f in sorted(trained)],
    }  # fmt: skip
    fields.update(overrides)
    return pb.UploadUpdateRequest(header=pb.UploadHeader(**fields))


def chunk_messages(payload: bytes, chunk_bytes: int) -> list[pb.UploadUpdateRequest]:
    return [
        pb.UploadUpdateRequest(chunk=pb.Chunk(offset=start, data=payload[start : start + chunk_bytes]))
        for start in range(0, len(payload), chunk_bytes)
    ]


def trained_of(task: pb.TrainTask) -> frozenset[Factor]:
    back = {number: factor for factor, number in FACTOR_NUMBERS.items()}
    return frozenset(back[n] for n in task.trained_factors)


def adapter_of(payload: bytes) -> Adapter:
    return decode_adapter(payload).to_adapter()


def encode_update(tensors: Mapping[str, Tensor]) -> bytes:
    return encode_adapter(tensors, {"producer": "tests"})


def core_aggregate(
    name: str, round_index: int, reference: Adapter, uploads: Sequence[tuple[str, bytes, int]]
) -> Adapter:
    """What the core computes for the same uploads, in the same order."""
    strategy = build_strategy(name, StrategyConfig(lam=0.4, align_first="A", seed=0))
    plan = strategy.plan(round_index)
    aggregator = strategy.start_round(reference, plan, device="cpu", track_error=True)
    schema = AdapterSchema.of(reference)
    for client, payload, weight in uploads:
        tensors = decode_adapter(payload, schema, plan.trained).tensors
        aggregator.add(client, reference.with_factors_from(tensors), weight)
    return aggregator.finalize().adapter


def assert_same(got: Adapter, expected: Adapter) -> None:
    got_sd, expected_sd = got.to_state_dict(), expected.to_state_dict()
    assert got_sd.keys() == expected_sd.keys()
    for key in expected_sd:
        torch.testing.assert_close(got_sd[key], expected_sd[key], rtol=1e-6, atol=1e-7, msg=key)


async def killed(server: FederationServer) -> None:
    """Like a SIGKILL: stop serving with no further write; the kernel would drop the lock."""
    await server.grpc_server.stop(0)
    task = server.engine._task
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await server.worker.close()
    server.store.close()
    if server.telemetry is not None:
        server.telemetry.close()
    assert server.lock is not None
    server.lock.release()


async def upload_once(client: WireClient, seed: int) -> int:
    response = await client.get_task(5.0)
    task = response.train
    update = await client.update_for(task, seed)
    return (await client.upload(task.round, update, trained_of(task))).status
