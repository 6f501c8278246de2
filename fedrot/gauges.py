"""Gauge solvers: how a strategy moves one client's factors toward the round's reference.

A gauge is ``(R, s)`` per module: ``R (r, r)`` a proper rotation and ``s > 0`` a scale. In row
layout (see :mod:`fedrot.alignment`) the aligned factor becomes ``s R^T X`` and the other factor
``R^T Y / s``, that is ``A <- s R^T A, B <- B R / s`` when ``A`` is aligned and
``B <- s B R, A <- R^T A / s`` when ``B`` is; the product ``B A`` is unchanged.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from fedrot.alignment import procrustes_rotation, sample_haar_rotation, soften_rotation


@dataclass(frozen=True)
class GaugeProblem:
    """One client's alignment problem for a group of ``K`` modules of rank ``r``.

    Row layout (see :mod:`fedrot.alignment`), float32: ``cross = X_i X_ref^T`` (the Procrustes
    matrix ``M``, ``(K, r, r)``), ``moving_sq = ||X_i||_F^2`` and ``reference_sq =
    ||X_ref||_F^2`` (both ``(K,)``). ``modules`` names the ``K`` modules in stack order.
    """

    client_id: str
    modules: tuple[str, ...]
    cross: Tensor
    moving_sq: Tensor
    reference_sq: Tensor


@dataclass(frozen=True)
class Gauge:
    """``rotation (K, r, r)`` float32 and ``scale (K,)`` float32 or None (``s = 1``).
    ``optimal`` is the det +1 Procrustes rotation of the problem when the solver computed it
    (the rotation drift diagnostic of :mod:`fedrot.drift` needs it), else None."""

    rotation: Tensor
    scale: Tensor | None = None
    optimal: Tensor | None = None


class GaugeSolver(ABC):
    """Computes the gauge of one client's update from its :class:`GaugeProblem`."""

    is_identity: bool = False
    """True when every gauge is ``(I, 1)``: the aggregator then averages plainly."""

    @abstractmethod
    def solve(self, problem: GaugeProblem) -> Gauge:
        """The gauge ``(R, s)`` for every module of the problem's group."""


class ProcrustesGauge(GaugeSolver):
    """FedRot-LoRA: ``R = polar((1 - lam) I + lam R*)`` with ``R*`` the det +1 Procrustes
    rotation of ``M = X_i X_ref^T``; no scaling. ``lam = 0`` is the identity (FedIT)."""

    def __init__(self, lam: float) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must lie in [0, 1], got {lam}")
        self.lam = lam
        self.is_identity = lam == 0.0

    def solve(self, problem: GaugeProblem) -> Gauge:
        optimal = procrustes_rotation(problem.cross)
        return Gauge(soften_rotation(optimal, self.lam), optimal=optimal)


def _stable_seed(*parts: object) -> int:
    """A 63-bit seed from its parts, the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class HaarGauge(GaugeSolver):
    """Ablation: an independent Haar SO(r) rotation per client and module, ignoring the data.

    Each module's generator is seeded from ``(seed, round_index, client_id, module)``, so the
    rotations are reproducible and depend neither on the order in which clients arrive nor on
    how modules are grouped. Sampled on the CPU in float64, so every device draws the same.
    """

    def __init__(self, seed: int, round_index: int) -> None:
        self.seed = seed
        self.round_index = round_index

    def solve(self, problem: GaugeProblem) -> Gauge:
        rank = problem.cross.shape[-1]
        rotations = [
            sample_haar_rotation(1, rank, torch.Generator().manual_seed(self._seed(problem, m)))
            for m in problem.modules
        ]
        return Gauge(torch.cat(rotations).to(problem.cross.device))

    def _seed(self, problem: GaugeProblem, module: str) -> int:
        return _stable_seed(self.seed, self.round_index, problem.client_id, module)


class ScalarGauge(GaugeSolver):
    """Ablation: rescale instead of rotate. ``c = ||X_i||_F / ||X_ref||_F`` for the aligned
    factor ``X``; ``X_i <- X_i / c`` and the other factor ``<- c * other`` (``c = 1`` when
    either norm is 0). ``R = I``."""

    def solve(self, problem: GaugeProblem) -> Gauge:
        ref_sq, moving_sq = problem.reference_sq, problem.moving_sq.clamp_min(0.0)
        usable = (ref_sq > 0) & (moving_sq > 0)
        ratio = torch.where(usable, moving_sq / torch.where(usable, ref_sq, 1.0), 1.0)
        scale = ratio.rsqrt()
        eye = torch.eye(problem.cross.shape[-1], device=scale.device, dtype=scale.dtype)
        return Gauge(eye.expand(problem.cross.shape).clone(), scale)
