"""Who takes part: the enrolled clients, when each was last heard from, and seeded sampling."""

from __future__ import annotations

import random
from collections.abc import Iterable


class Roster:
    """Enrolled clients and their last-seen times (monotonic seconds, the engine's clock).

    A client inside a call that waits on the server (a long poll) is held: it counts as live
    however long the call lasts.
    """

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._removed: set[str] = set()

    def __contains__(self, client: str) -> bool:
        return client in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def names(self) -> set[str]:
        """Every enrolled client."""
        return set(self._seen)

    def touch(self, client: str, now: float) -> None:
        """Record that ``client`` was heard from (enrolling counts; not once removed)."""
        if client not in self._removed:
            self._seen[client] = now

    def remove(self, client: str) -> None:
        """Forget ``client`` for good (revoked): it is neither live nor waited for any more."""
        self._removed.add(client)
        self._seen.pop(client, None)
        self._held.pop(client, None)

    def hold(self, client: str) -> None:
        self._held[client] = self._held.get(client, 0) + 1

    def release(self, client: str) -> None:
        left = self._held.get(client, 0) - 1
        if left > 0:
            self._held[client] = left
        else:
            self._held.pop(client, None)

    def live(self, now: float, timeout_s: float) -> list[str]:
        """Clients held, or heard from within ``timeout_s``; sorted by name."""
        return sorted(
            c for c, seen in self._seen.items() if c in self._held or now - seen <= timeout_s
        )


def sample_participants(
    candidates: Iterable[str], count: int, *, seed: int, round_index: int, attempt: int = 0
) -> list[str]:
    """``count`` of ``candidates`` (all when fewer), chosen by a generator seeded from
    ``(seed, round_index, attempt)``: the same inputs always give the same choice."""
    pool = sorted(set(candidates))
    if count >= len(pool):
        return pool
    generator = random.Random(f"fedrot-participants:{seed}:{round_index}:{attempt}")
    return sorted(generator.sample(pool, count))
