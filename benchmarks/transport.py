"""Transfer benchmark: the client's transport against a raw loopback TCP copy (not a test; see
docs/benchmarks.md, "Transfers").

A real server (``fedrot_server.service.start_server`` with a synthetic initial adapter of
``--layers`` x (q_proj, v_proj) modules of ``--d x --d`` at rank ``--rank``, FedRot, so round 0
trains and uploads both factors) runs in a subprocess on 127.0.0.1 port 0; beside it, in the
same subprocess, a raw TCP peer on another port 0. From this process:

- ``grpc_upload``: :meth:`fedrot_client.transport.Transport.upload_update` of one encoded update
  (the reference plus noise on A, B and the head) into round 0, with the chunk size the client
  takes from the server's limits, from the call to the acknowledgement (so it includes the
  QueryUpload, and the server's checks, aggregation, fsynced spool write and SQLite record;
  the client passes the digest it computed beforehand, as the daemon passes the one it saved
  with the update). Each repeat is another client, so round 0 stays open.
- ``grpc_download``: :meth:`~fedrot_client.transport.Transport.download_adapter` of round 0's
  global adapter (verified against its SHA-256).
- ``tcp_upload`` / ``tcp_download``: the same number of bytes copied over one loopback TCP
  connection to / from the peer (``socket.sendall`` / ``recv_into`` into a buffer allocated
  beforehand), up to the peer's one-byte acknowledgement (upload) or the last byte (download).
- ``tcp_durable_upload``: the raw upload again, the peer also writing each piece to a file in
  the server's state folder as it arrives and fsyncing it before its acknowledgement: what an
  upload that must be on disk before it is acknowledged could reach on this disk with no
  protocol at all (not part of the ratios).

The five measurements take turns in each repeat; each figure is the best of ``--repeats``. MB is
10^6 bytes. ``upload_ratio`` = ``tcp_upload_mb_s / grpc_upload_mb_s`` (1 = as fast as raw TCP).

    .venv/bin/python benchmarks/transport.py [--layers 32 --d 4096 --rank 100] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedrot.adapters import Adapter, LoraPair
from fedrot.codec import decode_adapter, encode_adapter
from fedrot_client.transport import MAX_CHUNK_BYTES, Transport, sha256_hex
from fedrot_proto.v1 import federation_pb2 as pb

PREFIX = "base_model.model.model.layers"
HEAD = "base_model.model.score"
START_TIMEOUT_S = 300.0
REQUEST = struct.Struct("<cQ")  # b"U" / b"F" (upload, to memory / to disk) or b"D", then the size
CHUNK_BYTES = 1024 * 1024
MB = 1e6


@dataclass(frozen=True)
class Shapes:
    """``layers`` x (q_proj, v_proj) modules of ``d x d`` at rank ``rank``, a head of
    ``labels x d``; float32 throughout."""

    layers: int = 32
    d: int = 4096
    rank: int = 100
    labels: int = 2

    def initial(self, seed: int = 0) -> Adapter:
        g = torch.Generator().manual_seed(seed)
        lora = {
            f"{PREFIX}.{i}.self_attn.{p}": LoraPair(
                A=torch.randn(self.rank, self.d, generator=g) / self.d**0.5,
                B=torch.zeros(self.d, self.rank),
            )
            for i in range(self.layers)
            for p in ("q_proj", "v_proj")
        }
        extra = {f"{HEAD}.weight": torch.randn(self.labels, self.d, generator=g) * 0.02}
        return Adapter(lora=lora, extra=extra)


# The server side (a subprocess: `transport.py serve CONFIG`).


def serve(config_path: Path) -> int:
    """Serve the federation and a raw TCP peer; print ``PORTS grpc tcp``; stop at stdin's end."""
    from fedrot_server.service import start_server
    from fedrot_server.settings import ServerSettings
    from fedrot_server.runs.spec import InitialModel

    config = json.loads(config_path.read_text())
    initial = Shapes(**config.pop("shapes")).initial()
    settings = ServerSettings(**config)

    async def main() -> None:
        server = await start_server(settings,
                                    initializer=lambda spec: InitialModel(initial, "sha256:bench"))  # fmt: skip
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=tcp_peer, args=(listener, settings.state_dir), daemon=True).start()
        print(f"PORTS {server.port} {listener.getsockname()[1]}", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # the parent closes stdin when done
        await server.stop(grace_s=1.0)

    asyncio.run(main())
    return 0


def tcp_peer(listener: socket.socket, folder: Path) -> None:
    """Answer raw copies, one connection at a time: receive ``n`` bytes and acknowledge with
    one byte (``U``; ``F``: also written to a file in ``folder`` as they arrive and fsynced
    before the acknowledgement), or send ``n`` bytes (``D``). Buffers are allocated once,
    outside the timed copies."""
    buffer = bytearray()
    while True:
        connection, _ = listener.accept()
        with connection:
            op, size = REQUEST.unpack(receive_exactly(connection, REQUEST.size))
            if len(buffer) < size:
                buffer = bytearray(os.urandom(size))
            view = memoryview(buffer)[:size]
            if op == b"D":
                connection.sendall(view)
                continue
            if op == b"F":
                receive_to_disk(connection, view, folder / "tcp-upload.bin")
            else:
                receive_into(connection, view)
            connection.sendall(b"K")


def receive_to_disk(connection: socket.socket, view: memoryview, path: Path) -> None:
    """Receive into ``view``, writing each piece to ``path`` as it comes; fsync at the end."""
    with path.open("wb") as handle:
        got = 0
        while got < len(view):
            n = connection.recv_into(view[got : got + CHUNK_BYTES])
            if n == 0:
                raise ConnectionError(f"peer closed after {got} of {len(view)} bytes")
            handle.write(view[got : got + n])
            got += n
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()


def receive_exactly(connection: socket.socket, size: int) -> bytes:
    target = bytearray(size)
    receive_into(connection, memoryview(target))
    return bytes(target)


def receive_into(connection: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = connection.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"peer closed after {got} of {len(view)} bytes")
        got += n


def server_config(shapes: Shapes, clients: list[str], state_dir: Path) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0", "dashboard_listen": "", "state_dir": str(state_dir),
        "tokens": {name: token_of(name) for name in clients}, "shapes": asdict(shapes),
        "lora": {"rank": shapes.rank, "alpha": 2.0 * shapes.rank,
                 "target_modules": ["q_proj", "v_proj"]},
        "rounds": 1, "min_clients": len(clients),  # round 0 stays open: one client never uploads
        "round_deadline_s": 3600.0, "client_timeout_s": 3600.0, "max_task_wait_s": 5.0,
        "device": "cpu", "log_level": "WARNING",
    }  # fmt: skip


def token_of(name: str) -> str:
    return f"bench-token-{name}-0123456789abcdef"


def start_peer(shapes: Shapes, clients: list[str], folder: Path) -> tuple[subprocess.Popen, int, int]:
    """The server subprocess and its gRPC and TCP ports."""
    config = folder / "server.json"
    config.write_text(json.dumps(server_config(shapes, clients, folder / "state")))
    log = (folder / "server.log").open("w")
    process = subprocess.Popen([sys.executable, __file__, "serve", str(config)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                               text=True)  # fmt: skip
    log.close()
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
    first = process.stdout.readline().split() if ready else []
    if len(first) != 3 or first[0] != "PORTS":
        process.kill()
        process.wait()
        raise RuntimeError(f"the server did not start:\n{(folder / 'server.log').read_text()}")
    return process, int(first[1]), int(first[2])


# The client side.


def tcp_upload(port: int, payload: bytes, op: bytes = b"U") -> float:
    """Seconds to copy ``payload`` to the peer, up to its acknowledgement."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(REQUEST.pack(op, len(payload)))
        connection.sendall(payload)
        if connection.recv(1) != b"K":
            raise ConnectionError("the TCP peer did not acknowledge the upload")
    return time.perf_counter() - started


def tcp_download(port: int, buffer: bytearray) -> float:
    """Seconds to receive ``len(buffer)`` bytes from the peer into ``buffer``."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(REQUEST.pack(b"D", len(buffer)))
        receive_into(connection, memoryview(buffer))
    return time.perf_counter() - started


def update_of(reference: bytes, seed: int) -> bytes:
    """An update of both factors and the head: the reference plus seeded noise (codec out)."""
    tensors = decode_adapter(reference).tensors
    g = torch.Generator().manual_seed(seed)
    moved = {k: t + 0.01 * torch.randn(t.shape, generator=g) for k, t in tensors.items()}
    return encode_adapter(moved, {"producer": "benchmarks/transport.py"})


@dataclass
class Client:
    """One enrolled client of the benchmark, with its round-0 task."""

    transport: Transport
    run_id: str
    task: pb.TrainTask
    chunk_bytes: int

    def upload(self, payload: bytes) -> float:
        header = pb.UploadHeader(run_id=self.run_id, round=self.task.round, sample_count=10,
                                 metrics={"train_loss": 1.0}, idempotency_key=uuid.uuid4().hex,
                                 factors=list(self.task.trained_factors))  # fmt: skip
        digest = sha256_hex(payload)  # the daemon saved it with the update before sending
        started = time.perf_counter()
        reply = self.transport.upload_update(header, payload, self.chunk_bytes, sha256=digest)
        seconds = time.perf_counter() - started
        if reply.status != pb.UPLOAD_STATUS_ACCEPTED:
            raise RuntimeError(f"upload answered {pb.UploadStatus.Name(reply.status)}")
        return seconds

    def download(self) -> tuple[float, bytes]:
        started = time.perf_counter()
        data = self.transport.download_adapter(self.run_id, self.task.round, self.task.global_adapter)
        return time.perf_counter() - started, data


def enroll_all(address: str, names: list[str]) -> list[Client]:
    """Enrol every client (the round opens once all are in), then take each one's task."""
    transports = [Transport(address, token_of(name), rpc_timeout_s=600.0) for name in names]
    replies = [t.enroll({"client": "benchmarks/transport.py"}) for t in transports]
    clients = []
    for transport, reply in zip(transports, replies, strict=True):
        while (task := transport.get_task(reply.run.run_id, 5.0)).WhichOneof("task") != "train":
            pass
        limits = reply.run.limits
        chunk = min(limits.chunk_bytes or MAX_CHUNK_BYTES, limits.max_chunk_bytes or MAX_CHUNK_BYTES,
                    MAX_CHUNK_BYTES)  # fmt: skip
        clients.append(Client(transport, reply.run.run_id, task.train, chunk))
    return clients


@dataclass(frozen=True)
class TransportResult:
    upload_bytes: int
    download_bytes: int
    repeats: int
    chunk_bytes: int
    grpc_upload_mb_s: float
    tcp_upload_mb_s: float
    upload_ratio: float
    tcp_durable_upload_mb_s: float
    grpc_download_mb_s: float
    tcp_download_mb_s: float
    download_ratio: float


def best_rate(size: int, times: list[float]) -> float:
    return size / min(times) / MB


def measure(clients: list[Client], tcp_port: int, repeats: int) -> TransportResult:
    """Interleave the four copies ``repeats`` times; the best rate of each."""
    _, reference = clients[-1].download()
    payload = update_of(reference, seed=1)
    down_buffer = bytearray(len(reference))
    times: dict[str, list[float]] = {k: [] for k in ("gu", "tu", "tf", "gd", "td")}
    steps: dict[str, Callable[[int], float]] = {
        "gu": lambda i: clients[i].upload(payload),
        "tu": lambda i: tcp_upload(tcp_port, payload),
        "tf": lambda i: tcp_upload(tcp_port, payload, b"F"),
        "gd": lambda i: clients[i].download()[0],
        "td": lambda i: tcp_download(tcp_port, down_buffer),
    }
    for i in range(repeats):
        for key, step in steps.items():
            times[key].append(step(i))
    up = (best_rate(len(payload), times["gu"]), best_rate(len(payload), times["tu"]))
    down = (best_rate(len(reference), times["gd"]), best_rate(len(reference), times["td"]))
    return TransportResult(
        upload_bytes=len(payload), download_bytes=len(reference), repeats=repeats,
        chunk_bytes=clients[0].chunk_bytes, grpc_upload_mb_s=up[0], tcp_upload_mb_s=up[1],
        upload_ratio=up[1] / up[0],
        tcp_durable_upload_mb_s=best_rate(len(payload), times["tf"]),
        grpc_download_mb_s=down[0], tcp_download_mb_s=down[1],
        download_ratio=down[1] / down[0],
    )  # fmt: skip


def run_benchmark(args: argparse.Namespace) -> TransportResult:
    shapes = Shapes(layers=args.layers, d=args.d, rank=args.rank)
    names = [f"client-{i}" for i in range(args.repeats + 1)]
    with tempfile.TemporaryDirectory(prefix="fedrot-transport-") as tmp:
        process, grpc_port, tcp_port = start_peer(shapes, names, Path(tmp))
        clients: list[Client] = []
        try:
            clients = enroll_all(f"127.0.0.1:{grpc_port}", names)
            return measure(clients, tcp_port, args.repeats)
        finally:
            for client in clients:
                client.transport.close()
            stop_peer(process)


def stop_peer(process: subprocess.Popen) -> None:
    assert process.stdin is not None
    process.stdin.close()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="layers of (q_proj, v_proj) modules")
    parser.add_argument("--d", type=int, default=4096, help="module width (d x d)")
    parser.add_argument("--rank", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(Path(argv[1]))
    result = run_benchmark(parse_arguments(argv))
    if argv and "--json" in argv:
        print(json.dumps(asdict(result), indent=2))
    else:
        for name, value in asdict(result).items():
            shown = f"{value:.2f}" if isinstance(value, float) else value
            print(f"{name:>20}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
