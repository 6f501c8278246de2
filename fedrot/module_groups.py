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
    """``modules`` (in schema order) that share ``d_out``, ``d_in`` and ``rank``; ``index``
    numbers the group within its adapter."""

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


MAX_GROUP_BYTES = 8 * 2**20
"""Cap on one stacked group's float32 factors (both A and B). Larger same-shape sets of small
modules are split, so a group's working stacks stay cache-resident while an update is aligned
and accumulated. Streamed groups (see :data:`STREAM_MODULE_BYTES`) have no stacks and are not
split: one group per shape keeps the r x r work (Procrustes, statistics) in one batch."""


STREAM_MODULE_BYTES = 128 * 2**10
"""Modules whose float32 factors (A and B together) take at least this many bytes are aligned
one at a time straight from the update's tensors: each GEMM is then large enough to hide the
per-call cost, and stacking them would only copy. Smaller modules are stacked first."""


def streams_modules(group: ModuleGroup) -> bool:
    """True when ``group``'s modules are large enough to be handled one by one (see
    :data:`STREAM_MODULE_BYTES`) rather than as a stacked batch."""
    return 4 * group.rank * (group.d_out + group.d_in) >= STREAM_MODULE_BYTES


def group_modules(
    schema: AdapterSchema, max_group_bytes: int = MAX_GROUP_BYTES
) -> tuple[ModuleGroup, ...]:
    """The schema's modules grouped by shape (first-appearance order), each group of small
    modules capped at ``max_group_bytes`` of float32 factors (at least one module per group);
    modules of :data:`STREAM_MODULE_BYTES` or more form one group per shape."""
    members: dict[tuple[int, int], list[str]] = {}
    for module, shape in schema.modules.items():
        members.setdefault(shape, []).append(module)
    groups: list[ModuleGroup] = []
    for (d_out, d_in), names in members.items():
        per_module = 4 * schema.rank * (d_out + d_in)
        size = max(1, max_group_bytes // max(per_module, 1))
        if per_module >= STREAM_MODULE_BYTES:
            size = len(names)
        for start in range(0, len(names), size):
            part = tuple(names[start : start + size])
            groups.append(ModuleGroup(len(groups), d_out, d_in, schema.rank, part))
    return tuple(groups)


def stack_factor(adapter: Adapter, group: ModuleGroup, which: Factor, out: Tensor) -> Tensor:
    """Copy the group's ``which`` factors of ``adapter`` into ``out`` (``group.stack_shape``,
    any float dtype, any device) and return it: one ``torch.stack`` (which also converts the
    dtype) when the factors are on ``out``'s device, else a converting copy per module."""
    lora, name = adapter.lora, str(which)
    factors = [getattr(lora[module], name) for module in group.modules]
    if factors[0].device == out.device:
        try:
            return torch.stack(factors, out=out)
        except RuntimeError:  # factors spread over several devices
            pass
    for k, factor in enumerate(factors):
        out[k].copy_(factor)
    return out


def empty_stack(
    group: ModuleGroup, which: Factor, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Uninitialised ``group.stack_shape(which)`` storage."""
    return torch.empty(group.stack_shape(which), device=device, dtype=dtype)


def rows_shape(group: ModuleGroup, which: Factor) -> tuple[int, int, int]:
    """Row layout (see :func:`fedrot.alignment.as_rows`): ``(K, r, d_in)`` for A,
    ``(K, r, d_out)`` for B."""
    return len(group.modules), group.rank, group.d_in if which is Factor.A else group.d_out


def _check_shape(key: str, expected: tuple[int, ...], tensor: Tensor) -> None:
    if tensor.shape != expected:
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
    modules, factor shapes, rank and extra tensors of ``schema``, all floating point."""
    if update.lora.keys() != schema.modules.keys():
        _check_keys("module", schema.modules, update.lora)
    rank = schema.rank
    for module, (d_out, d_in) in schema.modules.items():
        A, B = update.lora[module].A, update.lora[module].B
        fits = A.shape == (rank, d_in) and B.shape == (d_out, rank)
        if not (fits and A.is_floating_point() and B.is_floating_point()):
            _check_shape(Factor.A.key(module), (rank, d_in), A)
            _check_shape(Factor.B.key(module), (d_out, rank), B)
    if update.extra.keys() != schema.extra.keys():
        _check_keys("extra tensor", schema.extra, update.extra)
    for key, shape in schema.extra.items():
        _check_shape(key, tuple(shape), update.extra[key])
