"""The dashboard's advice on FedRot's lambda, read off a run's own drift diagnostic.

The thresholds come from the regime search in docs/results.md (section 8): alignment lowered the
aggregation error only where a rotation removed a large share of the clients' drift (the share
was 0.38 or more in every such round, and at most 0.013 in every round where alignment did not
help); where the share was small, aligning B early raised the error. Pure: rows in, text out.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedrot_server.storage.state import RoundRow

ALIGNED_STRATEGY = "fedrot"
LARGE_DRIFT_SHARE = 0.1
SMALL_DRIFT_SHARE = 0.02  # above every share measured where alignment did not help
RECENT_ROUNDS = 3
EVIDENCE = "docs/results.md, section 8"


def drift_shares(rounds: Sequence[RoundRow]) -> list[float]:
    """The rounds' ``rotation_drift_share`` values, in round order (rounds without one skipped)."""
    shares = (row.summary.get("rotation_drift_share") for row in rounds)
    return [float(s) for s in shares if isinstance(s, int | float)]


def lambda_hint(strategy: str | None, strength: float | None, rounds: Sequence[RoundRow]) -> str | None:
    """One sentence on the run's lambda from the mean drift share of its last few rounds; None
    for a strategy that does not rotate, or before a round reported the share."""
    shares = drift_shares(rounds)[-RECENT_ROUNDS:]
    if strategy != ALIGNED_STRATEGY or not shares:
        return None
    share = sum(shares) / len(shares)
    seen = f"A rotation removes {100 * share:.2g} % of the clients' drift (last {len(shares)} rounds)"
    if share >= LARGE_DRIFT_SHARE:
        if strength is not None and strength >= 1.0:
            return f"{seen}: their factors sit in different bases, where λ = 1 pays ({EVIDENCE})."
        return (f"{seen}: their factors sit in different bases. λ = 1 removes that error; "
                f"a soft λ recovered little of it ({EVIDENCE}).")  # fmt: skip
    if share < SMALL_DRIFT_SHARE:
        return (f"{seen}: they share a basis, so alignment cannot lower the error (aligning B "
                f"early raised it); FedIT (λ = 0) does as well for less ({EVIDENCE}).")  # fmt: skip
    return (f"{seen}: between the measured regimes; compare the FedIT error (dashed) with "
            f"FedRot's ({EVIDENCE}).")  # fmt: skip
