"""Fixtures of the core tests: the device matrix and a seeded torch."""

from __future__ import annotations

import pytest
import torch

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)


@pytest.fixture(params=["cpu", CUDA])
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device-parametrised test runs on the CPU and, where one exists, on CUDA."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(1234)
