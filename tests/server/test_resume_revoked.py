"""A client revoked before a crash stays out of the resumed round, which then closes as the
uncrashed one would."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fedrot_proto.v1 import federation_pb2 as pb
from fedrot_server.service import start_server
from wire import (
    WireClient,
    initializer_of,
    killed,
    make_settings,
    synthetic_adapter,
    token_of,
    upload_once,
)

NAMES = ("alice", "bob", "carol")


def test_a_revoked_participant_stays_out_of_the_resumed_round(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, NAMES, rounds=2, round_deadline_s=60.0, quorum="all")
    initializer = initializer_of(synthetic_adapter())

    async def scenario() -> None:
        server = await start_server(settings, initializer=initializer)
        clients = {n: WireClient(server.address, token_of(n)) for n in NAMES}
        await asyncio.gather(*(c.enroll() for c in clients.values()))
        assert await upload_once(clients["alice"], 1) == pb.UPLOAD_STATUS_ACCEPTED
        await server.engine.revoke("carol")
        for client in clients.values():
            await client.close()
        await killed(server)

        server = await start_server(settings, initializer=initializer)
        try:
            bob = WireClient(server.address, token_of("bob"), run_id=server.spec.run_id)
            assert await upload_once(bob, 2) == pb.UPLOAD_STATUS_ACCEPTED
            for _ in range(100):  # bob's report completes the round: carol is not waited for
                if server.store.rounds(server.spec.run_id)[0].phase.value == "closed":
                    break
                await asyncio.sleep(0.05)
            (round0, *_) = server.store.rounds(server.spec.run_id)
            assert round0.phase.value == "closed" and sorted(round0.reporters) == ["alice", "bob"]
            assert "carol" not in server.engine._live()
            await bob.close()
        finally:
            await server.stop(0.1)

    asyncio.run(scenario())
