"""Benchmark of one FedRot aggregation round (not a test; see docs/benchmarks.md).

Measures, in one run on the same inputs:

(a) ``fedrot_s``: the project's streaming FedRot aggregation (``build_strategy("fedrot")``,
    ``track_error=False``): every update aligned on arrival (GEMMs, batched Newton-Schulz
    polar factors with an SVD fallback) and accumulated in place;
(b) ``loop_s``: a straightforward per-module, per-client Python loop with one Procrustes SVD per
    module per client (plus the polar SVD of the soft rotation when 0 < lambda < 1), as in the
    paper's published implementation;
(c) ``fedit_s``: a plain FedIT weighted average, ``sum_i p_i X_i`` per state-dict key over the
    held updates, the way common FL frameworks write FedAvg.

Also reported: the project's own streaming FedIT (``fedit_streaming_s``), ``gemm_floor_s`` (only
the three GEMMs per module and client that any FedRot round needs, ``M = A_i A_ref^T``,
``R^T A_i`` and ``B_i R``, accumulated in place with a fixed ``R``: a lower bound for (a)), and
the peak memory of
(a) for N = 5 and N = 50 clients, each N in a fresh subprocess (CPU: peak RSS above the
baseline after setting up, via ``/proc/self/clear_refs`` and ``VmHWM``; CUDA:
``torch.cuda.max_memory_allocated`` above the baseline). Updates are produced one at a time in
the memory runs, as a server receives them. Times are the best of ``--repeats`` runs, the
candidates taking turns (a, b, c, ..., a, b, c, ...) so that their ratios compare the same
stretch of a shared machine's load.

    .venv/bin/python benchmarks/aggregation.py [--json] [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fedrot.adapters import Adapter, Factor, LoraPair
from fedrot.alignment import sample_haar_rotation
from fedrot.strategies import StrategyConfig, build_strategy


@dataclass(frozen=True)
class Shape:
    """``layers`` x ``projections`` square ``d x d`` modules of rank ``rank``; ``clients``."""

    name: str
    layers: int
    projections: tuple[str, ...]
    d: int
    rank: int
    clients: int

    def modules(self) -> list[str]:
        return [
            f"base_model.model.layers.{i}.{p}" for i in range(self.layers) for p in self.projections
        ]


SHAPES = {
    "roberta_large": Shape("roberta_large", 24, ("query", "value"), 1024, 4, 50),
    "llama_7b": Shape("llama_7b", 32, ("q_proj", "v_proj"), 4096, 16, 10),
}
ROUND = 1  # an odd round: FedRot aligns A against the reference
MEMORY_CLIENTS = (5, 50)


def make_reference(shape: Shape, device: str, seed: int = 0) -> Adapter:
    """A mid-training global adapter: Kaiming-like A, small nonzero B."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for module in shape.modules():
        A = torch.randn(shape.rank, shape.d, generator=gen) / shape.d**0.5
        B = 0.01 * torch.randn(shape.d, shape.rank, generator=gen)
        lora[module] = LoraPair(A=A.to(device), B=B.to(device))
    return Adapter(lora=lora)


def make_update(reference: Adapter, shape: Shape, client: int, device: str) -> Adapter:
    """The reference moved a little and expressed in a random latent basis (as after local
    training from different states)."""
    gen = torch.Generator().manual_seed(1000 + client)
    rotations = sample_haar_rotation(len(reference.lora), shape.rank, gen).to(device)
    lora = {}
    for k, (module, pair) in enumerate(reference.lora.items()):
        noise_a = torch.randn(pair.A.shape, generator=gen).to(device)
        noise_b = torch.randn(pair.B.shape, generator=gen).to(device)
        A = rotations[k].T @ (pair.A + 0.05 * noise_a / shape.d**0.5)
        B = (pair.B + 0.002 * noise_b) @ rotations[k]
        lora[module] = LoraPair(A=A, B=B)
    return Adapter(lora=lora)


def run_streaming(
    name: str,
    reference: Adapter,
    updates: Iterator[Adapter] | list[Adapter],
    lam: float,
    device: str,
    track_error: bool = False,
) -> Adapter:
    """(a), or the project's FedIT: stream the updates through the aggregator."""
    strategy = build_strategy(name, StrategyConfig(lam=lam))
    aggregator = strategy.start_round(
        reference, strategy.plan(ROUND), device=device, track_error=track_error
    )
    for i, update in enumerate(updates):
        aggregator.add(f"client-{i}", update, 1.0 + i % 3)
    return aggregator.finalize().adapter


def proper_polar(matrix: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(matrix)
    rotation = u @ vh
    if torch.linalg.det(rotation) < 0:
        vh[-1] *= -1
        rotation = u @ vh
    return rotation


def run_loop(reference: Adapter, updates: list[Adapter], lam: float) -> Adapter:
    """(b): module by module, client by client, one Procrustes SVD each (and the polar of the
    soft rotation for 0 < lambda < 1)."""
    weights = [1.0 + i % 3 for i in range(len(updates))]
    total = sum(weights)
    lora = {}
    for module, ref in reference.lora.items():
        eye = torch.eye(ref.rank, device=ref.A.device)
        sum_a, sum_b = torch.zeros_like(ref.A), torch.zeros_like(ref.B)
        for update, w in zip(updates, weights, strict=True):
            A, B = update.lora[module].A, update.lora[module].B
            rotation = proper_polar(A @ ref.A.T)
            if 0.0 < lam < 1.0:
                rotation = proper_polar((1 - lam) * eye + lam * rotation)
            sum_a += (w / total) * (rotation.T @ A)
            sum_b += (w / total) * (B @ rotation)
        lora[module] = LoraPair(A=sum_a, B=sum_b)
    return Adapter(lora=lora)


def run_plain_fedit(updates: list[Adapter]) -> dict[str, torch.Tensor]:
    """(c): ``sum_i p_i X_i`` per key over the held updates."""
    weights = [1.0 + i % 3 for i in range(len(updates))]
    total = sum(weights)
    states = [u.to_state_dict() for u in updates]
    return {
        key: sum(s[key] * (w / total) for s, w in zip(states, weights, strict=True))
        for key in states[0]
    }  # type: ignore[misc]


def run_gemm_floor(reference: Adapter, updates: list[Adapter]) -> None:
    """The GEMMs no FedRot round can skip, nothing else: per module and client the Procrustes
    matrix ``A_i A_ref^T`` and the in-place accumulation of ``R^T A_i`` and ``B_i R`` (a fixed
    ``R``; no polar factor, statistics, validation or division)."""
    first = next(iter(reference.lora.values()))
    rotation = torch.linalg.qr(torch.randn(first.rank, first.rank))[0].to(first.A.device)
    sums = {m: (torch.zeros_like(p.A), torch.zeros_like(p.B)) for m, p in reference.lora.items()}
    cross = torch.empty(first.rank, first.rank, device=first.A.device)
    for update in updates:
        for module, (sum_a, sum_b) in sums.items():
            A, B = update.lora[module].A, update.lora[module].B
            torch.mm(A, reference.lora[module].A.T, out=cross)
            sum_a.addmm_(rotation.T, A)
            sum_b.addmm_(B, rotation)


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_times(
    candidates: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, float]:
    """The best of ``repeats`` runs of each candidate, run in turn (a, b, c, a, b, c, ...), so
    that every candidate samples the same stretch of a shared machine's load."""
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(repeats):
        for name, fn in candidates.items():
            best[name] = min(best[name], timed(fn, device))
    return best


def max_relative_difference(a: Adapter, b: Adapter) -> float:
    worst = 0.0
    for module, pair in a.lora.items():
        for which in Factor:
            x, y = pair.factor(which).double(), b.lora[module].factor(which).double()
            worst = max(worst, float((x - y).norm() / y.norm()))
    return worst


def time_shape(shape: Shape, device: str, lam: float, repeats: int) -> dict[str, float]:
    reference = make_reference(shape, device)
    updates = [make_update(reference, shape, i, device) for i in range(shape.clients)]
    fedrot = run_streaming("fedrot", reference, updates, lam, device)
    loop = run_loop(reference, updates, lam)
    candidates: dict[str, Callable[[], object]] = {
        "fedrot_s": lambda: run_streaming("fedrot", reference, updates, lam, device),
        "loop_s": lambda: run_loop(reference, updates, lam),
        "fedit_s": lambda: run_plain_fedit(updates),
        "fedit_streaming_s": lambda: run_streaming("fedit", reference, updates, lam, device),
        "gemm_floor_s": lambda: run_gemm_floor(reference, updates),
    }
    out = best_times(candidates, repeats, device)
    out["fedrot_tracked_s"] = timed(
        lambda: run_streaming("fedrot", reference, updates, lam, device, True), device
    )
    out["max_rel_diff_vs_loop"] = max_relative_difference(fedrot, loop)
    out["speedup_vs_loop"] = out["loop_s"] / out["fedrot_s"]
    out["ratio_vs_fedit"] = out["fedrot_s"] / out["fedit_s"]
    out["ratio_vs_fedit_streaming"] = out["fedrot_s"] / out["fedit_streaming_s"]
    out["floor_ratio_vs_fedit"] = out["gemm_floor_s"] / out["fedit_s"]
    return out


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_peak(shape: Shape, clients: int, device: str, lam: float, track_error: bool) -> float:
    """Peak memory (MiB) of one streaming FedRot round above the set-up baseline."""
    reference = make_reference(shape, device)
    warm = make_update(reference, shape, 0, device)  # first-use allocations of the generator
    del warm
    updates = (make_update(reference, shape, i, device) for i in range(clients))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_streaming("fedrot", reference, updates, lam, device, track_error)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    base = _resident_kib("VmRSS")
    run_streaming("fedrot", reference, updates, lam, device, track_error)
    return (_resident_kib("VmHWM") - base) / 1024


def peak_in_subprocess(args: argparse.Namespace, shape: str, clients: int, tracked: bool) -> float:
    command = [
        sys.executable,
        __file__,
        "--peak",
        shape,
        str(clients),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--lam",
        str(args.lam),
    ] + (["--tracked"] if tracked else [])
    # A fixed mmap threshold: every large block is mapped on allocation and unmapped on free,
    # so the RSS peak reflects live tensors rather than glibc's adaptive heap growth.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(4096))
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def benchmark(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    for name in args.shapes:
        shape = SHAPES[name]
        row: dict[str, object] = dict(time_shape(shape, args.device, args.lam, args.repeats))
        for clients in MEMORY_CLIENTS:
            row[f"peak_mb_n{clients}"] = peak_in_subprocess(args, name, clients, False)
        if not args.skip_tracked:
            for clients in MEMORY_CLIENTS:
                row[f"peak_mb_n{clients}_tracked"] = peak_in_subprocess(args, name, clients, True)
        row.update(
            device=args.device,
            threads=args.threads,
            lam=args.lam,
            clients=shape.clients,
            modules=len(shape.modules()),
            d=shape.d,
            rank=shape.rank,
        )
        results[name] = row
    return results


def print_table(results: dict[str, dict[str, object]]) -> None:
    keys = [
        "fedrot_s",
        "loop_s",
        "fedit_s",
        "fedit_streaming_s",
        "gemm_floor_s",
        "fedrot_tracked_s",
        "speedup_vs_loop",
        "ratio_vs_fedit",
        "ratio_vs_fedit_streaming",
        "floor_ratio_vs_fedit",
        "peak_mb_n5",
        "peak_mb_n50",
        "peak_mb_n5_tracked",
        "peak_mb_n50_tracked",
        "max_rel_diff_vs_loop",
    ]
    names = list(results)
    print(f"{'':26s}" + "".join(f"{n:>16s}" for n in names))
    for key in keys:
        cells = []
        for n in names:
            value = results[n].get(key)
            cells.append(f"{value:16.4g}" if isinstance(value, float) else f"{'-':>16s}")
        print(f"{key:26s}" + "".join(cells))
    print(f"{'device':26s}" + "".join(f"{str(results[n]['device']):>16s}" for n in names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--lam", type=float, default=0.4, help="FedRot lambda (default 0.4)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many (default 3)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument(
        "--skip-tracked", action="store_true", help="skip the track_error=True memory runs"
    )
    parser.add_argument("--peak", nargs=2, metavar=("SHAPE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--tracked", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.peak:
        shape, clients = SHAPES[args.peak[0]], int(args.peak[1])
        print(measure_peak(shape, clients, args.device, args.lam, args.tracked))
        return
    results = benchmark(args)
    if args.json:
        print(json.dumps(results))
        return
    print_table(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
