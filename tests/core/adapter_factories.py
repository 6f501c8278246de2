"""Small random adapters for the core tests (a plain module: conftest is not importable)."""

from __future__ import annotations

import torch

from fedrot.adapters import Adapter, LoraPair

SHAPES = {"m.q": (6, 5), "m.v": (6, 5), "m.o": (4, 7)}
"""Module name -> (d_out, d_in): two modules share a shape group, one is alone."""


def random_adapter(
    generator: torch.Generator,
    *,
    rank: int = 3,
    shapes: dict[str, tuple[int, int]] | None = None,
    head: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Adapter:
    """An adapter with Gaussian factors ``A (r, d_in)``, ``B (d_out, r)`` and a head
    ``classifier.weight (2, 5)``."""
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
