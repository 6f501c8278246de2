"""Shared fixtures of the core tests: the device matrix and small random adapters."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedrot.adapters import Adapter, LoraPair

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


SHAPES = {"m.q": (6, 5), "m.v": (6, 5), "m.o": (4, 7)}
"""Module name -> (d_out, d_in): two modules share a shape group, one is alone."""

AdapterFactory = Callable[..., Adapter]


def random_adapter(
    generator: torch.Generator,
    *,
    rank: int = 3,
    shapes: dict[str, tuple[int, int]] | None = None,
    head: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Adapter:
    """An adapter with Gaussian factors ``A (r, d_in)``, ``B (d_out, r)`` and a head."""
    lora = {}
    for module, (d_out, d_in) in (shapes or SHAPES).items():
        lora[module] = LoraPair(
            A=torch.randn(rank, d_in, generator=generator, dtype=dtype).to(device),
            B=torch.randn(d_out, rank, generator=generator, dtype=dtype).to(device),
        )
    extra = {}
    if head:
        extra["classifier.weight"] = torch.randn(2, 5, generator=generator, dtype=dtype).to(device)
    return Adapter(lora=lora, extra=extra)


@pytest.fixture
def make_adapter() -> AdapterFactory:
    """A factory of random adapters: ``make_adapter(seed, **kwargs)``."""

    def make(seed: int, **kwargs: object) -> Adapter:
        return random_adapter(torch.Generator().manual_seed(seed), **kwargs)  # type: ignore[arg-type]

    return make
