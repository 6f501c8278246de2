"""Fixtures of the simulation tests (the builders live in simulation_fixtures.py)."""

from __future__ import annotations

import pytest

from fedrot_client.simulation import FederatedData
from simulation_fixtures import tiny_federation


@pytest.fixture
def federation() -> FederatedData:
    return tiny_federation()
