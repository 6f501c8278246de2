"""``fedrot-client`` that dies without a word (``os._exit``) just before uploading the round
named by ``FEDROT_TEST_DIE_AT_ROUND``: a machine lost mid-round, after training."""

from __future__ import annotations

import os
import sys

from fedrot_client import main as client_main
from fedrot_client.transport import Transport

DIE_AT_ROUND = int(os.environ["FEDROT_TEST_DIE_AT_ROUND"])
EXIT_STATUS = 137  # what SIGKILL leaves

_upload_update = Transport.upload_update


def upload_or_die(self: Transport, header, payload: bytes, chunk_bytes: int, **known):  # noqa: ANN
    if header.round >= DIE_AT_ROUND:
        sys.stdout.flush()
        os._exit(EXIT_STATUS)
    return _upload_update(self, header, payload, chunk_bytes, **known)


Transport.upload_update = upload_or_die  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(client_main.main())
