"""The dashboard's lambda advice, read off the run's drift shares (docs/results.md, section 8)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dashboard_state import T0, RecordedRun, record_showcase_run, serve_recorded
from fedrot_server.dashboard.hints import lambda_hint
from fedrot_server.storage.state import RoundPhase, RoundRow


def rounds_with(*shares: float | None) -> list[RoundRow]:
    summaries = [{} if s is None else {"rotation_drift_share": s} for s in shares]
    return [RoundRow("run", t, RoundPhase.CLOSED, T0, T0 + 60, ("a", "b"), summary=summary)
            for t, summary in enumerate(summaries)]  # fmt: skip


def test_no_hint_before_a_share_or_for_a_strategy_that_does_not_rotate() -> None:
    assert lambda_hint("fedrot", 0.4, rounds_with(None)) is None  # round 0 is never aligned
    assert lambda_hint("fedit", 0.0, rounds_with(None, 0.5, 0.5)) is None
    assert lambda_hint("ffa", None, rounds_with(None, 0.5)) is None


def test_a_small_share_advises_fedit() -> None:
    hint = lambda_hint("fedrot", 0.4, rounds_with(None, 0.0004, 0.002, 0.003))
    assert hint is not None and "0.18 %" in hint and "FedIT (λ = 0)" in hint
    # the largest share measured where alignment did not help (instruction tuning, B aligned)
    assert "FedIT (λ = 0)" in (lambda_hint("fedrot", 1.0, rounds_with(None, 0.013)) or "")


def test_a_large_share_advises_hard_alignment_unless_already_set() -> None:
    soft = lambda_hint("fedrot", 0.4, rounds_with(None, 0.9, 0.4))
    assert soft is not None and "65 %" in soft and "λ = 1 removes" in soft
    hard = lambda_hint("fedrot", 1.0, rounds_with(None, 0.9, 0.4))
    assert hard is not None and "where λ = 1 pays" in hard


def test_the_hint_follows_the_last_three_rounds() -> None:
    early_large = rounds_with(None, 0.9, 0.9, 0.001, 0.001, 0.001)
    assert "FedIT (λ = 0)" in (lambda_hint("fedrot", 0.4, early_large) or "")
    middle = lambda_hint("fedrot", 0.4, rounds_with(None, 0.05))
    assert middle is not None and "between the measured regimes" in middle


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    run: RecordedRun = record_showcase_run(tmp_path / "state", T0 + 5000.0)
    yield from serve_recorded(run, T0 + 5000.0)


def test_the_overview_carries_the_hint(client: TestClient) -> None:
    overview = client.get("/api/v1/runs/current").json()
    assert overview["strategy"] == "fedrot" and overview["alignment_strength"] < 1
    assert "λ = 1 removes" in overview["lambda_hint"]  # the showcase's shares are 0.55 to 0.73
