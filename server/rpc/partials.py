"""Unfinished uploads the server holds, so that an upload cut mid-stream resumes where it broke.

When an UploadUpdate stream ends before the whole payload arrived (the link dropped, the client
stalled past ``upload_stall_s`` or went away, a chunk was refused), the bytes of every chunk
taken so far stay here, with their running SHA-256. The client asks for them (QueryUpload) and
sends the rest under the same header. Bounds: one partial per client (its latest update),
owned by the open round. A partial is dropped when the round closes, when the same client
opens an upload of another update (key, size or digest), when its stream starts over at offset
0, and once the whole payload arrived (the update is then counted or refused, never resumed).

The bytes are in the receiver's sink, a draft file of the spool
(:class:`~fedrot_server.storage.artifacts.SpoolDraft`, in the run's ``incoming/`` folder), like those
of a stream in progress, and bounded like them: a client holds one receiver per round,
streaming or kept here (a new stream takes it out, a broken one puts it back), and no receiver
takes more bytes than its header announced, a size refused above the round's upload bound (the
largest encoded update of the run's schema, see
:meth:`~fedrot_server.runs.uploads.UploadIntake.upload_bound`). A resume has the same header, so it
cannot grow the partial; another header drops it. A dropped partial's draft is removed. A
restarted server holds nothing (it removes every draft at start); its clients learn that from
QueryUpload and send the whole update (the spool proper holds only verified uploads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedrot_server.runs.tasks import UploadIdentity
from fedrot_server.rpc.transfers import Announced, PayloadReceiver, PayloadSink


@dataclass(frozen=True)
class PartialUpload:
    identity: UploadIdentity
    receiver: PayloadReceiver


class PartialUploads:
    """The latest unfinished upload of each client of one round (event loop only)."""

    def __init__(self) -> None:
        self._held: dict[str, PartialUpload] = {}

    def __len__(self) -> int:
        return len(self._held)

    def bytes_held(self, client: str, identity: UploadIdentity) -> int:
        """Bytes of ``identity``'s payload held for ``client``; 0 for any other update."""
        held = self._held.get(client)
        return held.receiver.received if held is not None and held.identity == identity else 0

    def claim(
        self,
        client: str,
        identity: UploadIdentity,
        *,
        max_chunk_bytes: int,
        new_sink: Callable[[], PayloadSink],
    ) -> PayloadReceiver:
        """The receiver a new stream of ``identity`` continues: the held one when it is the same
        update, else a fresh one into ``new_sink()`` (and another update's bytes are dropped).
        Until :meth:`keep` hands it back, the stream owns it."""
        held = self._held.get(client)
        if held is not None and held.identity == identity:
            del self._held[client]
            return held.receiver
        fresh = PayloadReceiver(Announced(identity.total_size, identity.sha256),
                                max_chunk_bytes=max_chunk_bytes, sink=new_sink())  # fmt: skip
        self.drop(client)
        return fresh

    def keep(self, client: str, identity: UploadIdentity, receiver: PayloadReceiver) -> None:
        """Hold what a broken stream received, for its resumption (a receiver that got no byte
        is discarded). Its thread must be done (:meth:`PayloadReceiver.drain`)."""
        if receiver.received:
            self._held[client] = PartialUpload(identity, receiver)
        else:
            receiver.discard()

    @property
    def total_bytes(self) -> int:
        """Bytes held for every client together."""
        return sum(held.receiver.received for held in self._held.values())

    def drop(self, client: str) -> None:
        """Forget ``client``'s held bytes (it withdrew: its update will not come)."""
        held = self._held.pop(client, None)
        if held is not None:
            held.receiver.discard()

    def clear(self) -> None:
        for held in self._held.values():
            held.receiver.discard()
        self._held.clear()
