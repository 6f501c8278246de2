"""Files a run leaves in the state directory.

Layout, under ``<state_dir>/runs/<run_id>/``::

    initial/adapter/                 the round-0 global adapter (PEFT directory)
    rounds/<t>/adapter/              the global adapter produced by round t (what round t + 1
                                     starts from): adapter_config.json + adapter_model.safetensors
    rounds/<t>/report.json           the round's aggregation report and summary
    rounds/<t>/base_deltas.safetensors   FedEx-LoRA only: cumulative base-weight deltas
    rounds/<t>/uploads/<client>.safetensors  the spool: every upload aggregated in round t, as
                                     received (a late one as ``<client>@round-<r>.safetensors``),
                                     durable before it is acknowledged; removed when the round
                                     closes unless ``keep_uploads``
    incoming/<client>.<id>.part      an upload while it streams (:class:`SpoolDraft`), moved
                                     into the spool once verified; removed when refused or
                                     dropped, and at every start (a restarted server holds none)

A PEFT directory loads with ``PeftModel.from_pretrained(base_model, path)``: the config is
PEFT's own ``LoraConfig`` written by PEFT, the weights are the bytes the clients download.
Base-weight deltas are ``(alpha / r) * sum_t residual_t`` per module, shape ``(d_out, d_in)``
float32, keyed by the base model's weight key (``<module>.weight`` without PEFT's
``base_model.model.`` prefix), ready to add to the base model's state dict.
"""

from __future__ import annotations

import json
import mmap
import os
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedrot.codec import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, decode_adapter, encode_adapter
from fedrot_server.run_settings import LoraSettings, ModelSettings

BASE_DELTAS_FILE = "base_deltas.safetensors"
PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
INCOMING = "incoming"
WRITEBACK_BYTES = 16 * 1024 * 1024
"""A streaming spool file asks the disk to write its bytes back every this many bytes (an
fdatasync on another thread), so that the fsync before the acknowledgement finds little left."""


def write_atomically(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` durably: a temporary file, fsync, rename, fsync the folder.

    After a crash at any point ``path`` holds either its old content or ``data``, never a part.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    sync_folder(path.parent)
    return path


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename inside it survives a crash (POSIX)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class SpoolDraft:
    """An upload's spool file while its bytes arrive, in the run's ``incoming/`` folder.

    Chunks are written at their offsets as they come (:meth:`write`); every
    :data:`WRITEBACK_BYTES` the disk is asked, on ``writeback`` (an executor), to write them
    back meanwhile (an fdatasync, whose error fails the next write or :meth:`sync`).
    :meth:`publish` makes the file durable (fsync) and moves it to its spool path (rename,
    folder fsync): after a crash at any point the spool path holds the whole upload or nothing.
    :meth:`discard` removes an unpublished draft. Blocking: one thread at a time, off the event
    loop (:meth:`discard`, a close and an unlink, waits for nothing).
    """

    def __init__(self, path: Path, writeback: Executor | None = None) -> None:
        self.path = path
        self._writeback = writeback
        self._fd: int | None = None
        self._flushing: Future[None] | None = None
        self._unflushed = 0
        self._dirty = False  # written since the last fsync
        self.published = False

    def write(self, offset: int, data: bytes) -> None:
        fd = self._open()
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        self._dirty = True
        self._unflushed += len(data)
        if self._writeback is not None and self._unflushed >= WRITEBACK_BYTES:
            if self._flushing is None or self._flushing.done():
                self._settle()  # the last write-back's error, if any, is this write's
                self._flushing = self._writeback.submit(os.fdatasync, fd)
                self._unflushed = 0

    def truncate(self) -> None:
        """Forget every byte written (the upload starts over)."""
        self._settle()
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            self._dirty = True

    def contents(self) -> mmap.mmap:
        """The bytes written so far, mapped copy-on-write: reading them copies nothing, and
        writing to the map never changes the file. Never closed here: tensors viewing it keep
        it alive."""
        return mmap.mmap(self._open(), 0, access=mmap.ACCESS_COPY)

    def sync(self) -> None:
        """Make every byte written durable (fsync; nothing to do when nothing changed since)."""
        self._settle()
        if self._dirty:
            os.fsync(self._open())
            self._dirty = False

    def publish(self, path: Path) -> Path:
        """Move the (synced) draft to ``path`` durably; the draft is then done."""
        self.sync()
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, path)
        sync_folder(path.parent)
        self.published, self.path = True, path
        self._close()
        return path

    def discard(self) -> None:
        """Close the draft and remove its file (nothing once published)."""
        self._close()
        if not self.published:
            self.path.unlink(missing_ok=True)

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return self._fd

    def _settle(self) -> None:
        """Wait for the background writeback and raise its error: a write-back error is
        reported once per open file, so the fsync after it would not see it again."""
        flushing, self._flushing = self._flushing, None
        if flushing is not None:
            flushing.result()

    def _close(self) -> None:
        """Close the file now, or once a writeback still running on it ends (not waited for)."""
        fd, self._fd = self._fd, None
        flushing, self._flushing = self._flushing, None
        if fd is None:
            return
        if flushing is None:
            os.close(fd)
        else:
            flushing.add_done_callback(lambda _: os.close(fd))


def spool_name(client: str, trained_round: int, merged_round: int) -> str:
    """The spool file of ``client``'s update for ``trained_round`` merged into ``merged_round``.
    A late one is marked with ``@``, which no client name holds (names may hold dots: a client
    named ``alice.round-0`` must not share ``alice``'s late file)."""
    if trained_round == merged_round:
        return f"{client}.safetensors"
    return f"{client}@round-{trained_round}.safetensors"


def adapter_metadata(run_id: str, produced_by: int | None) -> dict[str, str]:
    """The safetensors header metadata of a global adapter: ``round`` names its folder
    (``"initial"``, or ``t`` for ``rounds/<t>/``, the round whose aggregation made it),
    ``starts_round`` the round that trains from it (the round a client downloads it for),
    ``format`` what transformers' safetensors loader asks for."""
    first = 0 if produced_by is None else produced_by + 1
    named = "initial" if produced_by is None else str(produced_by)
    return {"run_id": run_id, "round": named, "starts_round": str(first), "format": "pt"}


def saved_modules(extra_keys: Iterable[str]) -> list[str]:
    """PEFT ``modules_to_save`` names implied by an adapter's extra keys.

    ``base_model.model.classifier.weight`` -> ``classifier``.
    """
    names = set()
    for key in extra_keys:
        module = key.removeprefix(PEFT_PREFIX).rpartition(".")[0]
        if module:
            names.add(module)
    return sorted(names)


def peft_config(
    model: ModelSettings, lora: LoraSettings, extra_keys: Iterable[str], *,
    base_model_path: str = "",
) -> dict[str, Any]:
    """The ``adapter_config.json`` content PEFT writes for this run's LoRA (PEFT builds it).
    ``base_model_path`` (a local folder of the base model) is what the config names, so that
    ``AutoPeftModel...from_pretrained(adapter)`` loads; without it, the model setting's name."""
    from peft import LoraConfig  # heavy import: only the server's artifact writer needs it

    modules_to_save = list(lora.modules_to_save) or saved_modules(extra_keys) or None
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=peft_target_modules(lora.target_modules),
        modules_to_save=modules_to_save,
        task_type=PEFT_TASK_TYPES[model.task],
        inference_mode=True,
    )
    config.base_model_name_or_path = base_model_path or model.name
    data = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}


def peft_target_modules(names: Iterable[str]) -> str | list[str]:
    """PEFT's ``target_modules``: the shorthand ``"all-linear"`` must be a string, not a list."""
    names = list(names)
    return names[0] if names == [ALL_LINEAR] else names


def base_weight_key(module: str) -> str:
    """The base model's weight key of a PEFT module name."""
    return module.removeprefix(PEFT_PREFIX) + ".weight"


class RunArtifacts:
    """Writes one run's files (see the module docstring). Blocking: call off the event loop."""

    def __init__(
        self,
        state_dir: Path,
        run_id: str,
        adapter_config: Mapping[str, Any],
        *,
        delta_scale: float = 1.0,
    ) -> None:
        """``delta_scale`` (LoRA ``alpha / r``) turns FedEx residuals into base-weight units."""
        self.root = state_dir / "runs" / run_id
        self.run_id = run_id
        self._config_text = json.dumps(dict(adapter_config), indent=2, sort_keys=True)
        self._delta_scale = delta_scale
        self._base_deltas: dict[str, Tensor] = {}
        self._writeback = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fedrot-writeback")

    def round_dir(self, round_index: int) -> Path:
        return self.root / "rounds" / str(round_index)

    def adapter_dir(self, round_index: int | None) -> Path:
        """The PEFT directory of round ``round_index``'s output (None: the initial adapter)."""
        base = self.root / "initial" if round_index is None else self.round_dir(round_index)
        return base / "adapter"

    def save_adapter(self, round_index: int | None, payload: bytes) -> Path:
        """Write a PEFT directory holding the encoded adapter ``payload``."""
        folder = self.adapter_dir(round_index)
        write_atomically(folder / ADAPTER_WEIGHTS_FILE, payload)
        write_atomically(folder / ADAPTER_CONFIG_FILE, self._config_text.encode())
        return folder

    def report_path(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "report.json"

    def save_report(self, round_index: int, report: Mapping[str, Any]) -> Path:
        text = json.dumps(dict(report), indent=2, sort_keys=True, default=str)
        return write_atomically(self.report_path(round_index), text.encode())

    def read_report(self, round_index: int) -> dict[str, Any]:
        """Round ``round_index``'s report as :meth:`save_report` wrote it."""
        return json.loads(self.report_path(round_index).read_text())

    def save_round(
        self,
        round_index: int,
        payload: bytes,
        report: Mapping[str, Any],
        base_deltas: Mapping[str, Tensor],
    ) -> Path:
        """Write round ``round_index``'s adapter, report and (FedEx) cumulative base deltas.

        ``base_deltas``: this round's residuals ``(d_out, d_in)`` per PEFT module name, in
        product units; they are scaled by ``delta_scale`` and added to the running total.
        """
        folder = self.save_adapter(round_index, payload)
        self.save_report(round_index, report)
        if base_deltas:
            for module, delta in base_deltas.items():
                key = base_weight_key(module)
                scaled = self._delta_scale * delta.to(torch.float32)
                total = self._base_deltas.get(key)
                self._base_deltas[key] = scaled if total is None else total + scaled
            payload = encode_adapter(self._base_deltas, adapter_metadata(self.run_id, round_index))
            write_atomically(self.round_dir(round_index) / BASE_DELTAS_FILE, payload)
        return folder

    def spool_path(self, merged_round: int, client: str, trained_round: int) -> Path:
        return self.round_dir(merged_round) / "uploads" / spool_name(client, trained_round,
                                                                     merged_round)  # fmt: skip

    def save_upload(
        self, round_index: int, client: str, payload: bytes, *, trained_round: int | None = None
    ) -> Path:
        """Spool an accepted upload (durably) before it is recorded and acknowledged."""
        trained = round_index if trained_round is None else trained_round
        return write_atomically(self.spool_path(round_index, client, trained), payload)

    def draft_upload(self, client: str) -> SpoolDraft:
        """A new draft for an upload of ``client`` that starts streaming (no file yet)."""
        name = f"{client}.{uuid.uuid4().hex}.part"
        return SpoolDraft(self.root / INCOMING / name, self._writeback)

    def publish_upload(
        self, draft: SpoolDraft, round_index: int, client: str, *, trained_round: int
    ) -> Path:
        """Move a verified draft into round ``round_index``'s spool (durably) before the
        upload is recorded and acknowledged."""
        return draft.publish(self.spool_path(round_index, client, trained_round))

    def clear_incoming(self) -> None:
        """Remove the drafts a previous server left (it stopped or crashed mid-upload)."""
        for path in (self.root / INCOMING).glob("*.part"):
            path.unlink(missing_ok=True)

    def read_upload(self, round_index: int, client: str, *, trained_round: int) -> bytes:
        path = self.spool_path(round_index, client, trained_round)
        legacy = path.with_name(f"{client}.round-{trained_round}.safetensors")
        if trained_round != round_index and not path.exists() and legacy.exists():
            path = legacy  # a late upload spooled before the ``@`` naming
        return path.read_bytes()

    def drop_uploads(self, round_index: int) -> None:
        """Remove round ``round_index``'s spool (once the round is closed and recorded)."""
        folder = self.round_dir(round_index) / "uploads"
        for path in folder.glob("*.safetensors"):
            path.unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    def read_adapter(self, round_index: int | None) -> bytes:
        """The encoded adapter saved by :meth:`save_adapter` (None: the initial adapter)."""
        return (self.adapter_dir(round_index) / ADAPTER_WEIGHTS_FILE).read_bytes()

    def restore_base_deltas(self, round_index: int) -> None:
        """Resume the FedEx running total from round ``round_index``'s saved deltas (if any)."""
        path = self.round_dir(round_index) / BASE_DELTAS_FILE
        if path.is_file():
            self._base_deltas = dict(decode_adapter(path.read_bytes()).tensors)
