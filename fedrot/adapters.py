"""In-memory adapters: LoRA factor pairs and other trainable tensors, in PEFT's key naming.

A PEFT adapter state dict holds, for every LoRA-adapted module, two tensors
``<module>.lora_A.weight`` of shape ``(r, d_in)`` and ``<module>.lora_B.weight`` of shape
``(d_out, r)``, where ``<module>`` is the full dotted prefix (for example
``base_model.model.bert.encoder.layer.0.attention.self.query``). Every other key is an
"extra" trainable tensor (a classification head, PEFT ``modules_to_save``): those are averaged,
never rotated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from torch import Tensor

from fedrot.errors import SchemaError

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


class Factor(StrEnum):
    """One of the two LoRA factors of a module."""

    A = "A"
    B = "B"

    @property
    def suffix(self) -> str:
        return LORA_A_SUFFIX if self is Factor.A else LORA_B_SUFFIX

    def key(self, module: str) -> str:
        """The PEFT state-dict key of this factor of ``module``."""
        return module + self.suffix


BOTH_FACTORS: frozenset[Factor] = frozenset({Factor.A, Factor.B})


@dataclass(frozen=True)
class LoraPair:
    """The factors of one module: ``A`` is ``(r, d_in)``, ``B`` is ``(d_out, r)``."""

    A: Tensor
    B: Tensor

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise SchemaError(
                f"LoRA factors do not fit: A {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the product ``B @ A``."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def factor(self, which: Factor) -> Tensor:
        return self.A if which is Factor.A else self.B


@dataclass(frozen=True)
class Adapter:
    """LoRA pairs keyed by module name, plus extra trainable tensors keyed by their full key."""

    lora: Mapping[str, LoraPair]
    extra: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora", MappingProxyType(dict(self.lora)))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, Tensor]) -> Adapter:
        """Split a PEFT state dict; every module must have both factors."""
        factors, extra = split_state_dict(tensors)
        lora = {}
        for module, pair in factors.items():
            missing = BOTH_FACTORS - pair.keys()
            if missing:
                key = next(iter(missing)).key(module)
                raise SchemaError(f"missing key {key}", key=key)
            lora[module] = LoraPair(A=pair[Factor.A], B=pair[Factor.B])
        return cls(lora=lora, extra=extra)

    def to_state_dict(self) -> dict[str, Tensor]:
        """The PEFT state dict: ``<module>.lora_A.weight``, ``<module>.lora_B.weight``, extras."""
        out: dict[str, Tensor] = {}
        for module, pair in self.lora.items():
            out[Factor.A.key(module)] = pair.A
            out[Factor.B.key(module)] = pair.B
        out.update(self.extra)
        return out

    def with_factors_from(self, partial: Mapping[str, Tensor]) -> Adapter:
        """This adapter with the tensors in ``partial`` (PEFT keys) put in place of its own.

        A client that trained only some factors (FFA-LoRA: B only) uploads only those; the
        server completes the update from the round's reference, whose frozen factors the
        client kept. Keys of ``partial`` must exist in this adapter.
        """
        factors, extra = split_state_dict(partial)
        lora = dict(self.lora)
        for module, given in factors.items():
            if module not in lora:
                key = next(iter(given)).key(module)
                raise SchemaError(f"unexpected key {key}: no such module", key=key)
            old = lora[module]
            lora[module] = LoraPair(A=given.get(Factor.A, old.A), B=given.get(Factor.B, old.B))
        unknown = sorted(set(extra) - set(self.extra))
        if unknown:
            raise SchemaError(f"unexpected key {unknown[0]}", key=unknown[0])
        return Adapter(lora=lora, extra={**self.extra, **extra})


def split_state_dict(
    tensors: Mapping[str, Tensor],
) -> tuple[dict[str, dict[Factor, Tensor]], dict[str, Tensor]]:
    """Split PEFT keys into ``{module: {Factor: tensor}}`` and ``{key: tensor}`` for the rest."""
    factors: dict[str, dict[Factor, Tensor]] = {}
    extra: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        for which in Factor:
            if key.endswith(which.suffix):
                factors.setdefault(key[: -len(which.suffix)], {})[which] = tensor
                break
        else:
            extra[key] = tensor
    return factors, extra


@dataclass(frozen=True)
class AdapterSchema:
    """The shapes an adapter of a run must have: the contract every upload is checked against.

    ``modules`` maps a module name to ``(d_out, d_in)``; every module has rank ``rank``.
    ``extra`` maps each extra key to its shape.
    """

    rank: int
    modules: Mapping[str, tuple[int, int]]
    extra: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    @classmethod
    def of(cls, adapter: Adapter) -> AdapterSchema:
        ranks = {pair.rank for pair in adapter.lora.values()}
        if len(ranks) > 1:
            raise SchemaError(f"modules of different ranks {sorted(ranks)} in one adapter")
        return cls(
            rank=ranks.pop() if ranks else 0,
            modules={m: pair.shape for m, pair in adapter.lora.items()},
            extra={k: tuple(t.shape) for k, t in adapter.extra.items()},
        )

    def expected_shapes(
        self, factors: Iterable[Factor] = BOTH_FACTORS, *, with_extra: bool = True
    ) -> dict[str, tuple[int, ...]]:
        """Every key an upload of ``factors`` (plus extras) must hold, with its shape."""
        wanted = frozenset(factors)
        out: dict[str, tuple[int, ...]] = {}
        for module, (d_out, d_in) in self.modules.items():
            if Factor.A in wanted:
                out[Factor.A.key(module)] = (self.rank, d_in)
            if Factor.B in wanted:
                out[Factor.B.key(module)] = (d_out, self.rank)
        if with_extra:
            out.update(self.extra)
        return out
