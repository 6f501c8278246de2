"""Load benchmark of the federation server (not a test; see docs/benchmarks.md, "Load").

A real ``fedrot-server`` (``fedrot_server.main.serve`` with a synthetic initial adapter of small
shapes) runs in a subprocess on 127.0.0.1 port 0; ``--clients`` lightweight clients in this
process (one asyncio gRPC channel each) speak the real protocol for ``--rounds`` rounds: Enroll,
GetTask long polls, DownloadAdapter (verified), a synthetic update through the codec (the
reference plus noise on the trained factors and the head), a chunked UploadUpdate.

Reported: errors (any failed call; must be 0), p50 / p99 / max upload latency (from the first
message sent to the acknowledgement), server peak RSS (``ru_maxrss`` of the server process) and
its RSS once serving, the run's wall time (first Enroll to the last client told DONE), rounds
per minute over that time, and the server's own mean round time (from its round reports).

    nice -n 10 .venv/bin/python benchmarks/load.py [--clients 100] [--rounds 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import hashlib
import json
import os
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from fedrot.adapters import Adapter, Factor, LoraPair, split_state_dict
from fedrot.codec import decode_adapter, encode_adapter
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_proto.v1 import federation_pb2_grpc as pb_grpc

PREFIX = "base_model.model.encoder.layer"
HEAD = "base_model.model.classifier"
FACTOR_OF = {pb.FACTOR_A: Factor.A, pb.FACTOR_B: Factor.B}
CALL_TIMEOUT_S = 120.0
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Shapes:
    """``layers`` x (query, value) modules of ``d x d`` with rank ``rank``, a head of
    ``labels x d``: float32 throughout."""

    layers: int = 2
    d: int = 64
    rank: int = 4
    labels: int = 2

    def initial(self, seed: int = 0) -> Adapter:
        g = torch.Generator().manual_seed(seed)
        lora = {
            f"{PREFIX}.{i}.attention.{p}": LoraPair(
                A=torch.randn(self.rank, self.d, generator=g) / self.d**0.5,
                B=torch.zeros(self.d, self.rank),
            )
            for i in range(self.layers)
            for p in ("query", "value")
        }
        extra = {f"{HEAD}.weight": torch.randn(self.labels, self.d, generator=g) * 0.02,
                 f"{HEAD}.bias": torch.zeros(self.labels)}  # fmt: skip
        return Adapter(lora=lora, extra=extra)


# The server side (a subprocess: `load.py serve CONFIG`).


def serve(config_path: Path) -> int:
    """Run one server from the JSON ``config_path``; print ``PORT n`` when serving and a JSON
    line with the peak RSS at the end."""
    from fedrot_server.main import serve as serve_run
    from fedrot_server.settings import ServerSettings
    from fedrot_server.runs.spec import InitialModel

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks to the log, on request
    config = json.loads(config_path.read_text())
    torch.set_num_threads(config.pop("threads"))
    initial = Shapes(**config.pop("shapes")).initial()
    settings = ServerSettings(**config)

    async def main() -> int:
        started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        run = asyncio.ensure_future(serve_run(
            settings, initializer=lambda spec: InitialModel(initial, "sha256:load"), started=started
        ))  # fmt: skip
        server = await started
        print(f"PORT {server.port} RSS {rss_now()}", flush=True)
        return await run

    code = asyncio.run(main())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_bytes": peak}), flush=True)
    return code


def rss_now() -> int:
    """This process's resident set size in bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def server_config(args: argparse.Namespace, state_dir: Path) -> dict[str, Any]:
    tokens = {f"client-{i:03d}": token_of(i) for i in range(args.clients)}
    shapes = Shapes(layers=args.layers, d=args.d, rank=args.rank)
    return {
        "listen": "127.0.0.1:0", "state_dir": str(state_dir), "tokens": tokens,
        "shapes": asdict(shapes), "threads": args.threads,
        "lora": {"rank": shapes.rank, "alpha": 2.0 * shapes.rank,
                 "target_modules": ["query", "value"]},
        "strategy": {"name": args.strategy}, "rounds": args.rounds, "min_clients": args.clients,
        "round_deadline_s": 600.0, "client_timeout_s": 600.0, "max_task_wait_s": 30.0,
        "linger_s": 60.0, "final_download_grace_s": 0.0, "device": "cpu",
        "track_error": True, "keep_uploads": True, "log_level": "WARNING",
    }  # fmt: skip


def token_of(index: int) -> str:
    return f"load-token-{index:03d}-{hashlib.sha256(str(index).encode()).hexdigest()[:16]}"


# The client side.


@dataclass
class Stats:
    upload_s: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    rounds_trained: int = 0
    bytes_up: int = 0


class LoadClient:
    """One lightweight client: its own channel, the real protocol, synthetic updates."""

    def __init__(self, index: int, address: str, stats: Stats, chunk_bytes: int) -> None:
        self.name, self.stats, self.chunk_bytes = f"client-{index:03d}", stats, chunk_bytes
        self.metadata = (("authorization", f"Bearer {token_of(index)}"),)
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.FederationServiceStub(self.channel)
        self.seed = index

    async def run(self) -> None:
        try:
            request = pb.EnrollRequest(info={"client": "load"})
            call = self.stub.Enroll(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)
            enrolled = await call
            await self.work(enrolled.run.run_id)
        except grpc.aio.AioRpcError as error:
            self.stats.errors[f"{error.code().name}: {error.details()}"] += 1
        except Exception as error:  # noqa: BLE001 - every failure is counted and reported
            self.stats.errors[f"{type(error).__name__}: {error}"] += 1
        finally:
            await self.channel.close()

    async def work(self, run_id: str) -> None:
        while True:
            request = pb.GetTaskRequest(run_id=run_id)
            request.max_wait.FromSeconds(30)
            task = await self.stub.GetTask(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)
            kind = task.WhichOneof("task")
            if kind == "done":
                return
            if kind == "train":
                reference = await self.download(run_id, task.train.round)
                trained = {FACTOR_OF[f] for f in task.train.trained_factors}
                payload = await asyncio.to_thread(self.update, reference, trained)
                await self.upload(run_id, task.train.round, payload, task.train.trained_factors)

    async def download(self, run_id: str, round_index: int) -> bytes:
        request = pb.DownloadAdapterRequest(run_id=run_id, round=round_index)
        header, data = None, bytearray()
        async for message in self.stub.DownloadAdapter(request, metadata=self.metadata,
                                                       timeout=CALL_TIMEOUT_S):  # fmt: skip
            if message.WhichOneof("part") == "header":
                header = message.header
            else:
                data += message.chunk.data
        if header is None or hashlib.sha256(data).hexdigest() != header.sha256:
            raise ValueError(f"{self.name}: round {round_index} adapter failed its sha256 check")
        return bytes(data)

    def update(self, reference: bytes, trained: set[Factor]) -> bytes:
        """The reference plus seeded noise on the trained factors and the extras (codec out)."""
        tensors = decode_adapter(reference).tensors
        factors, extra = split_state_dict(tensors)
        g = torch.Generator().manual_seed(self.seed)
        self.seed += 1000
        out = {k: t + 0.01 * torch.randn(t.shape, generator=g) for k, t in extra.items()}
        for module, pair in factors.items():
            for which in trained:
                t = pair[which]
                out[which.key(module)] = t + 0.01 * torch.randn(t.shape, generator=g)
        return encode_adapter(out, {"producer": "load"})

    async def upload(self, run_id: str, round_index: int, payload: bytes, factors: Any) -> None:
        header = pb.UploadHeader(
            run_id=run_id, round=round_index, sample_count=100 + self.seed % 7,
            metrics={"train_loss": 1.0}, total_size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(), idempotency_key=uuid.uuid4().hex,
            factors=list(factors),
        )  # fmt: skip

        async def messages():  # noqa: ANN202
            yield pb.UploadUpdateRequest(header=header)
            for offset in range(0, len(payload), self.chunk_bytes):
                data = payload[offset : offset + self.chunk_bytes]
                yield pb.UploadUpdateRequest(chunk=pb.Chunk(offset=offset, data=data))

        started = time.perf_counter()
        call = self.stub.UploadUpdate(messages(), metadata=self.metadata, timeout=CALL_TIMEOUT_S)
        reply = await call
        self.stats.upload_s.append(time.perf_counter() - started)
        if reply.status != pb.UPLOAD_STATUS_ACCEPTED:
            raise ValueError(f"{self.name}: round {round_index} upload answered {reply.status}")
        self.stats.rounds_trained += 1
        self.stats.bytes_up += len(payload)


async def drive(args: argparse.Namespace, address: str) -> tuple[Stats, float]:
    """Run every client to the end of the run; ``(stats, wall seconds)``."""
    stats = Stats()
    clients = [LoadClient(i, address, stats, args.chunk_bytes) for i in range(args.clients)]
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), args.timeout)
    return stats, time.perf_counter() - started


@dataclass(frozen=True)
class LoadResult:
    clients: int
    rounds: int
    strategy: str
    payload_bytes: int
    errors: int
    error_kinds: dict[str, int]
    uploads: int
    upload_p50_ms: float
    upload_p99_ms: float
    upload_max_ms: float
    server_rss_serving_mib: float
    server_peak_rss_mib: float
    wall_s: float
    rounds_per_minute: float
    server_round_mean_s: float


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def start_server(args: argparse.Namespace, folder: Path) -> tuple[subprocess.Popen, int, int]:
    """The server subprocess, its port and its RSS once serving."""
    config = folder / "server.json"
    config.write_text(json.dumps(server_config(args, folder / "state")))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    log = (folder / "server.log").open("w")
    process = subprocess.Popen([sys.executable, __file__, "serve", str(config)], env=env,
                               stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    log.close()
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
    first = process.stdout.readline().split() if ready else []
    if len(first) != 4 or first[0] != "PORT":
        process.send_signal(signal.SIGUSR1)  # its threads' stacks, into the log
        time.sleep(1.0)
        process.kill()
        process.wait()
        raise RuntimeError(f"the server did not start:\n{(folder / 'server.log').read_text()}")
    return process, int(first[1]), int(first[3])


def round_seconds(state_dir: Path) -> list[float]:
    reports = sorted(state_dir.glob("runs/*/rounds/*/report.json"))
    return [json.loads(p.read_text())["summary"]["duration_s"] for p in reports]


def run_load(args: argparse.Namespace) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="fedrot-load-") as tmp:
        folder = Path(tmp)
        process, port, rss_serving = start_server(args, folder)
        try:
            stats, wall = asyncio.run(drive(args, f"127.0.0.1:{port}"))
            out, _ = process.communicate(timeout=args.timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if process.returncode != 0:
            log = (folder / "server.log").read_text()
            raise RuntimeError(f"server exit {process.returncode}:\n{log}")
        peak = json.loads(out.strip().splitlines()[-1])["peak_rss_bytes"]
        seconds = round_seconds(folder / "state")
    mib, ms = 1024 * 1024, 1000.0
    payload = stats.bytes_up // max(1, len(stats.upload_s))
    return LoadResult(
        clients=args.clients, rounds=args.rounds, strategy=args.strategy, payload_bytes=payload,
        errors=sum(stats.errors.values()), error_kinds=dict(stats.errors),
        uploads=len(stats.upload_s), upload_p50_ms=percentile(stats.upload_s, 0.5) * ms,
        upload_p99_ms=percentile(stats.upload_s, 0.99) * ms,
        upload_max_ms=max(stats.upload_s, default=float("nan")) * ms,
        server_rss_serving_mib=rss_serving / mib, server_peak_rss_mib=peak / mib, wall_s=wall,
        rounds_per_minute=60.0 * len(seconds) / wall,
        server_round_mean_s=statistics.fmean(seconds) if seconds else float("nan"),
    )  # fmt: skip


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--strategy", default="fedrot")
    parser.add_argument("--layers", type=int, default=2, help="layers of (query, value) modules")
    parser.add_argument("--d", type=int, default=64, help="module width (d x d)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--chunk-bytes", type=int, default=64 * 1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole run")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(Path(argv[1]))
    args = parse_arguments(argv)
    result = run_load(args)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        for name, value in asdict(result).items():
            shown = f"{value:.1f}" if isinstance(value, float) else value
            print(f"{name:>24}: {shown}")
    return 0 if result.errors == 0 and result.uploads == result.clients * result.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
