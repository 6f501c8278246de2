"""Groups of same-shaped LoRA modules, stacked so that one batched call handles a whole group.

A group holds the ``K`` modules sharing ``(d_out, d_in, r)``; its factors stack to
``A: (K, r, d_in)`` and ``B: (K, d_out, r)``. Also here: the check that an update has exactly the
reference's schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedrot.adapters import Adapter, AdapterSchema, Factor
from fedrot.errors import SchemaError


@dataclass(frozen=True)
class ModuleGroup:
    """``modules`` (in schema order) that share ``d_out``, ``d_in`` and ``rank``."""

    index: int
    d_out: int
    d_in: int
    rank: int
    modules: tuple[str, ...]

    def stack_shape(self, which: Factor) -> tuple[int, int, int]:
        """``(K, r, d_in)`` for A, ``(K, d_out, r)`` for B."""
        if which is Factor.A:
            return len(self.modules), self.rank, self.d_in
        return len(self.modules), self.d_out, self.rank


def group_modules(schema: AdapterSchema) -> tuple[ModuleGroup, ...]:
    """The schema's modules grouped by shape, groups and members in first-appearance order."""
    members: dict[tuple[int, int], list[str]] = {}
    for module, shape in schema.modules.items():
        members.setdefault(shape, []).append(module)
    return tuple(
        ModuleGroup(index=i, d_out=d_out, d_in=d_in, rank=schema.rank, modules=tuple(names))
        for i, ((d_out, d_in), names) in enumerate(members.items())
    )


def stack_factor(adapter: Adapter, group: ModuleGroup, which: Factor, out: Tensor) -> Tensor:
    """Copy the group's ``which`` factors of ``adapter`` into ``out`` (``group.stack_shape``),
    converting dtype and device on the way; returns ``out``."""
    for k, module in enumerate(group.modules):
        out[k].copy_(adapter.lora[module].factor(which))
    return out


def stack_difference(
    adapter: Adapter, group: ModuleGroup, which: Factor, reference: Tensor, out: Tensor
) -> Tensor:
    """``out = stack(adapter's factors) - reference`` in one pass per module; ``reference`` and
    ``out`` are float32 stacks of ``group.stack_shape(which)`` on one device; returns ``out``."""
    for k, module in enumerate(group.modules):
        factor = adapter.lora[module].factor(which).to(out.device)
        torch.sub(factor, reference[k], out=out[k])
    return out


def empty_stack(
    group: ModuleGroup, which: Factor, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor:
    return torch.empty(group.stack_shape(which), device=device, dtype=dtype)


def _check_shape(key: str, expected: tuple[int, ...], tensor: Tensor) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise SchemaError(
            f"{key}: expected shape {tuple(expected)}, got {tuple(tensor.shape)}", key=key
        )
    if not tensor.is_floating_point():
        raise SchemaError(f"{key}: expected a floating-point tensor, got {tensor.dtype}", key=key)


def _check_keys(kind: str, expected: Mapping[str, object], given: Mapping[str, object]) -> None:
    missing = [k for k in expected if k not in given]
    if missing:
        raise SchemaError(f"update lacks {kind} {missing[0]}", key=missing[0])
    unexpected = [k for k in given if k not in expected]
    if unexpected:
        raise SchemaError(f"update has unexpected {kind} {unexpected[0]}", key=unexpected[0])


def check_update(update: Adapter, schema: AdapterSchema) -> None:
    """Raise :class:`SchemaError` (naming the key and shapes) unless ``update`` has exactly the
    modules, factor shapes, rank and extra tensors of ``schema``."""
    _check_keys("module", schema.modules, update.lora)
    for module, (d_out, d_in) in schema.modules.items():
        pair = update.lora[module]
        _check_shape(Factor.A.key(module), (schema.rank, d_in), pair.A)
        _check_shape(Factor.B.key(module), (d_out, schema.rank), pair.B)
    _check_keys("extra tensor", schema.extra, update.extra)
    for key, shape in schema.extra.items():
        _check_shape(key, shape, update.extra[key])
