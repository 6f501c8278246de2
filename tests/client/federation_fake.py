"""A small scripted FederationService for the daemon's unit tests (real gRPC, port 0).

One client, a tiny-BERT run; each accepted upload replaces the global factors it carries and
opens the next round. Faults are switched on by arguments: a download that breaks off after
its first chunk, an upload refused once with UNAVAILABLE after all its bytes arrived, a round
the heartbeat reports closed, a long poll that blocks until released.

A standing server is scripted too: ``runs`` runs one after the other (ids ``run-test``,
``run-test-2``, ...), each starting from the same initial adapter; Enroll answers ``wait``
``waits`` times before each run starts, and for good after the last when ``standing``; DONE
says ``server_continues`` while another run follows (or ``standing``). DeclineRun ends the run
for the client on a standing server (``standing`` or ``runs`` > 1); a single-run server offers
the declined run again (``after_decline``: or refuses the enrolment, or answers ``wait``).
``run_labels[k]`` are run k's label names.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from fedrot.adapters import Adapter, AdapterSchema, Factor
from fedrot.codec import decode_adapter, encode_adapter
from fedrot_client.lora import LoraSpec, attach_lora, export_adapter
from fedrot_client.models import ModelSpec, load_base_model
from fedrot_client.transport import sha256_hex
from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_proto.v1 import federation_pb2_grpc as pb_grpc

TOKEN = "token-of-client-a-0123456789"
RUN_ID = "run-test"
CLIENT_ID = "client-a"
MODEL = ModelSpec("tiny-bert", num_labels=2, seed=0)
LORA = LoraSpec(r=2, alpha=4.0, dropout=0.0)
WAIT_LIMIT_S = 30.0  # a bound on every wait inside the fake, so a broken test cannot hang


@dataclass
class Script:
    """What the fake does; ``trained[t]`` are the factors round ``t`` trains."""

    rounds: int = 2
    trained: tuple[tuple[int, ...], ...] = ((pb.FACTOR_A, pb.FACTOR_B), (pb.FACTOR_B,))
    fingerprint: str | None = None  # None: the real one
    chunk_bytes: int = 2048
    break_first_download: bool = False
    refuse_first_upload: bool = False
    internal_first_upload: bool = False  # INTERNAL (not retried) once all its bytes arrived
    close_rounds: frozenset[int] = frozenset()
    block_polls: bool = False
    restart_after_round: int | None = None  # then a new run starts, as after a restart
    scale_on_accept: float = 1.0  # the next global B factors are the uploaded ones times this
    learning_rate: float = 0.05
    refuse_rounds: frozenset[int] = frozenset()  # uploads refused with INVALID_ARGUMENT
    deadline_polls: int | None = None  # a round offered this often passes its deadline
    runs: int = 1
    standing: bool = False
    waits: int = 0
    retry_after_s: float = 0.01
    run_labels: tuple[tuple[str, ...], ...] = ()
    decline_unimplemented: bool = False
    reoffer_finished: int = 0  # Enroll answers a finished run this often before the next
    after_decline: str = "reoffer"  # a single-run server's Enroll: "reoffer", "refuse", "wait"
    log: dict[str, list] = field(default_factory=lambda: {
        "download_offsets": [], "upload_headers": [], "accepted": [],
        "heartbeats": [], "enrolments": [], "declined": []})  # fmt: skip


class FakeFederation(pb_grpc.FederationServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.log = script.log
        base = load_base_model(MODEL)
        self.fingerprint = base.fingerprint if script.fingerprint is None else script.fingerprint
        self.initial_tensors = export_adapter(attach_lora(base, LORA, seed=7))
        self.global_tensors = dict(self.initial_tensors)
        self.schema = AdapterSchema.of(Adapter.from_state_dict(self.global_tensors))
        self.round = 0
        self.run_index = -1  # no run yet: the first Enroll (after `waits` waits) starts run 0
        self.run_id = ""
        self.run_over = True
        self.declined = False
        self.waits_left = script.waits
        self.reoffered = 0
        self.waited = threading.Event()
        self.lock = threading.Lock()
        self.keys: set[str] = set()
        self.poll_started = threading.Event()
        self.release = threading.Event()
        self.closed_heartbeat_sent = threading.Event()
        self.polls: dict[int, int] = {}

    # -- helpers -------------------------------------------------------------------------------
    def _authenticate(self, context: grpc.ServicerContext, run_id: str | None = None) -> None:
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown token")
        if run_id is not None and run_id != self.run_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"run {run_id} is not current")

    def payload(self) -> bytes:
        with self.lock:
            return encode_adapter(self.global_tensors)

    def _start_next_run(self) -> None:
        self.run_index += 1
        self.run_id = RUN_ID if self.run_index == 0 else f"{RUN_ID}-{self.run_index + 1}"
        self.round, self.run_over, self.declined = 0, False, False
        self.waits_left = self.script.waits
        self.global_tensors = dict(self.initial_tensors)

    def _has_next_run(self) -> bool:
        return self.run_index + 1 < self.script.runs

    def _wait(self, reason: str) -> pb.EnrollResponse:
        wait = pb.WaitTask(reason=reason)
        wait.retry_after.FromNanoseconds(int(self.script.retry_after_s * 1e9))
        self.log["enrolments"].append(("wait", reason))
        self.waited.set()
        return pb.EnrollResponse(client_id=CLIENT_ID, wait=wait)

    def run_spec(self) -> pb.RunSpec:
        schema = pb.AdapterSchema(rank=self.schema.rank)
        for name, (d_out, d_in) in sorted(self.schema.modules.items()):
            schema.modules.add(name=name, d_out=d_out, d_in=d_in)
        for key, shape in sorted(self.schema.extra.items()):
            schema.extra.add(key=key, shape=list(shape))
        spec = pb.RunSpec(
            run_id=self.run_id,
            model=pb.ModelSpec(name=MODEL.name, task=pb.MODEL_TASK_CLASSIFICATION,
                               num_labels=len(self._labels()) or MODEL.num_labels,
                               seed=MODEL.seed,
                               fingerprint=self.fingerprint,
                               label_names=list(self._labels())),  # fmt: skip
            lora=pb.LoraConfig(rank=LORA.r, alpha=LORA.alpha, dropout=LORA.dropout,
                               target_modules=list(LORA.target_modules)),  # fmt: skip
            strategy=pb.StrategySpec(name="fedrot", alignment_strength=0.4, odd_round_factor="A"),
            schema=schema,
            limits=pb.TransferLimits(max_chunk_bytes=4 << 20, chunk_bytes=self.script.chunk_bytes,
                                     max_upload_bytes=1 << 30),  # fmt: skip
            rounds=self.script.rounds,
        )
        spec.heartbeat_interval.FromSeconds(5)
        return spec

    # -- the service ---------------------------------------------------------------------------
    def _labels(self) -> tuple[str, ...]:
        labels = self.script.run_labels
        return labels[self.run_index] if 0 <= self.run_index < len(labels) else ()

    def Enroll(self, request, context):  # noqa: N802
        self._authenticate(context)
        with self.lock:
            stands = self.script.standing or self.script.runs > 1
            over = self.run_over or (self.declined and stands)
            started = self.run_index >= 0
            if started and self.run_over and self.script.reoffer_finished > self.reoffered:
                self.reoffered += 1
                over = False  # a server slow to move on offers the finished run again
            if over and self._has_next_run() and self.waits_left > 0:
                self.waits_left -= 1
                return self._wait("the next run has not started")
            if over and self._has_next_run():
                self._start_next_run()
            elif over and self.script.standing:
                return self._wait("no run scheduled")
            if self.declined and not stands and self.script.after_decline == "wait":
                return self._wait(f"client declined run {self.run_id}")
            if self.declined and not stands and self.script.after_decline == "refuse":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"client declined run {self.run_id}")  # fmt: skip
            self.log["enrolments"].append(("run", self.run_id))
            return pb.EnrollResponse(client_id=CLIENT_ID, run=self.run_spec(),
                                     run_status=pb.RUN_STATUS_RUNNING)  # fmt: skip

    def DeclineRun(self, request, context):  # noqa: N802
        self._authenticate(context, request.run_id)
        if self.script.decline_unimplemented:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        with self.lock:
            self.log["declined"].append((request.run_id, request.reason))
            self.declined = True
        return pb.DeclineRunResponse()

    def GetTask(self, request, context):  # noqa: N802
        self._authenticate(context, request.run_id)
        if self.script.block_polls:
            self.poll_started.set()
            self.release.wait(WAIT_LIMIT_S)
            return pb.GetTaskResponse(wait=pb.WaitTask(reason="released"))
        with self.lock:
            self.polls[self.round] = self.polls.get(self.round, 0) + 1
            if self.script.deadline_polls and self.polls[self.round] > self.script.deadline_polls:
                self.round += 1  # the round closed without this client
        if self.round >= self.script.rounds:
            self.run_over = True
            return pb.GetTaskResponse(done=pb.DoneTask(
                rounds_completed=self.round, reason="all rounds done",
                final_adapter=self._ref(self.round),
                server_continues=self.script.standing or self._has_next_run()))  # fmt: skip
        task = pb.TrainTask(
            round=self.round,
            trained_factors=list(self.script.trained[self.round]),
            hyperparameters=pb.TrainingHyperparameters(
                local_steps=3, batch_size=4, learning_rate=self.script.learning_rate,
                optimizer="sgd", max_length=24,
                seed=self.round),  # fmt: skip
            global_adapter=self._ref(self.round),
        )
        return pb.GetTaskResponse(train=task)

    def _ref(self, round_index: int) -> pb.AdapterRef:
        payload = self.payload()
        return pb.AdapterRef(round=round_index, size_bytes=len(payload), sha256=sha256_hex(payload))

    def DownloadAdapter(self, request, context):  # noqa: N802
        self._authenticate(context, request.run_id)
        if request.round in self.script.close_rounds:
            self.closed_heartbeat_sent.wait(WAIT_LIMIT_S)
        first = not self.log["download_offsets"]
        self.log["download_offsets"].append(request.offset)
        payload = self.payload()
        size = self.script.chunk_bytes
        yield pb.DownloadAdapterResponse(header=pb.TransferHeader(
            total_size=len(payload), sha256=sha256_hex(payload), chunk_bytes=size))  # fmt: skip
        for offset in range(request.offset, len(payload), size):
            data = payload[offset : offset + size]
            yield pb.DownloadAdapterResponse(chunk=pb.Chunk(offset=offset, data=data))
            if first and self.script.break_first_download:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost (scripted)")

    def UploadUpdate(self, request_iterator, context):  # noqa: N802
        self._authenticate(context)
        header = next(request_iterator).header
        if header.run_id != self.run_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"run {header.run_id} is over")
        data = b"".join(message.chunk.data for message in request_iterator)
        self.log["upload_headers"].append(header)
        if sha256_hex(data) != header.sha256 or len(data) != header.total_size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sha256 or size mismatch")
        if self.script.refuse_first_upload and len(self.log["upload_headers"]) == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting (scripted)")
        if self.script.internal_first_upload and len(self.log["upload_headers"]) == 1:
            context.abort(grpc.StatusCode.INTERNAL, "a server fault (scripted)")
        if header.round in self.script.refuse_rounds:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a value exceeds the limit (scripted)")
        if header.idempotency_key in self.keys:
            return pb.UploadUpdateResponse(status=pb.UPLOAD_STATUS_DUPLICATE,
                                           bytes_received=len(data))  # fmt: skip
        factors = [Factor.A if f == pb.FACTOR_A else Factor.B for f in header.factors]
        tensors = decode_adapter(data, self.schema, factors).tensors
        with self.lock:
            self.keys.add(header.idempotency_key)
            self.log["accepted"].append((header, tensors))
            scale = self.script.scale_on_accept
            scaled = {k: v * scale if k.endswith(".lora_B.weight") else v
                      for k, v in tensors.items()}  # fmt: skip
            self.global_tensors = {**self.global_tensors, **scaled}
            self.round += 1
            if header.round == self.script.restart_after_round and self.run_id == RUN_ID:
                self.run_id, self.round = RUN_ID + "-restarted", 0
        return pb.UploadUpdateResponse(status=pb.UPLOAD_STATUS_ACCEPTED, bytes_received=len(data),
                                       upload_id=f"upload-{len(self.keys)}")  # fmt: skip

    def Heartbeat(self, request, context):  # noqa: N802
        self._authenticate(context, request.run_id)
        self.log["heartbeats"].append((request.round, request.phase))
        closed = request.round in self.script.close_rounds
        if closed and not self.closed_heartbeat_sent.is_set():
            with self.lock:
                self.round += 1  # the deadline passed without this client
            self.closed_heartbeat_sent.set()
        return pb.HeartbeatResponse(run_status=pb.RUN_STATUS_RUNNING, current_round=self.round,
                                    round_open=not closed)  # fmt: skip


class RunningFake:
    """A started gRPC server around a :class:`FakeFederation`, on 127.0.0.1 port 0."""

    def __init__(self, script: Script) -> None:
        self.servicer = FakeFederation(script)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_FederationServiceServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.servicer.release.set()
        self.servicer.closed_heartbeat_sent.set()
        self.server.stop(grace=None)
