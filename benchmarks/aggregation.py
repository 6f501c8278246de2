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

Also reported: the project's own streaming FedIT (``fedit_streaming_s``), ``plain_inplace_s``
(the fastest plain weighted average: per key, one preallocated buffer, ``mul(out=)`` then one
``add_(alpha=p_i)`` per update, each update read once), ``gemm_floor_s`` (only the three GEMMs
per module and client that any FedRot round needs, ``M = A_i A_ref^T``, ``R^T A_i`` and
``B_i R``, accumulated in place with a fixed ``R``: a lower bound for (a) were its sums
float32; ``gemm_floor_exact_s`` is the same with the float64 sums of float32 terms that make
(a) independent of the arrival order), and the peak memory
of (a) for N = 5 and N = 50 clients, each N in a fresh subprocess (CPU: peak RSS above the
baseline after setting up, via ``/proc/self/clear_refs`` and ``VmHWM``; CUDA:
``torch.cuda.max_memory_allocated`` above the baseline). Updates are produced one at a time in
the memory runs, as a server receives them. With ``track_error=True`` (the default of a
server), each N of ``--clients-tracked`` (5, 50, 200) runs in a fresh subprocess too
(``--gram-budget 0``: with the dense error path from the first client), which
reports the round's time (every ``add`` and ``finalize``) and its peak memory; those rounds
cycle through a pool of distinct updates generated before the baseline, so the peak is the
aggregator's own. ``--precision`` also compares the tracked error's paths on each shape's
round (Gram blocks, a float32 and a float64 dense accumulator; see
:mod:`fedrot.error_tracking`). Times are the best of ``--repeats`` runs, the candidates taking
turns (a, b, c, ..., a, b, c, ...) so that their ratios compare the same stretch of a shared
machine's load.

    .venv/bin/python benchmarks/aggregation.py [--json] [--device cuda] [--threads 1]
        [--clients-tracked 5,50,200] [--gram-budget B] [--skip-tracked] [--precision]
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
TRACKED_CLIENTS = (5, 50, 200)
UPDATE_POOL = 8  # distinct updates the tracked rounds cycle through


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


def run_plain_inplace(states: list[dict[str, torch.Tensor]], out: dict[str, torch.Tensor]) -> None:
    """The fastest plain weighted average: per key, the preallocated ``out`` buffer is written
    once (``mul(out=)``) and then gets one in-place ``add_(alpha=p_i)`` per update (the buffer
    stays in cache while each update is read once)."""
    weights = [1.0 + i % 3 for i in range(len(states))]
    total = sum(weights)
    p = [w / total for w in weights]
    for key, buffer in out.items():
        torch.mul(states[0][key], p[0], out=buffer)
        for state, pi in zip(states[1:], p[1:], strict=True):
            buffer.add_(state[key], alpha=pi)


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


def run_gemm_floor_exact(reference: Adapter, updates: list[Adapter]) -> None:
    """:func:`run_gemm_floor` with the accumulation an order-independent sum needs (see
    :mod:`fedrot.weighted_sums`): each rotated factor written as a float32 term into a reused
    buffer, converted, and added into a float64 sum."""
    first = next(iter(reference.lora.values()))
    device = first.A.device
    rotation = torch.linalg.qr(torch.randn(first.rank, first.rank))[0].to(device)
    wide = {"dtype": torch.float64, "device": device}
    sums = {
        m: (torch.zeros(p.A.shape, **wide), torch.zeros(p.B.shape, **wide))  # type: ignore
        for m, p in reference.lora.items()
    }
    cross = torch.empty(first.rank, first.rank, device=device)
    terms = {f: torch.empty(first.factor(f).shape, device=device) for f in Factor}
    scratch = {
        f: torch.empty(first.factor(f).shape, **wide)  # type: ignore
        for f in Factor
    }
    for update in updates:
        for module, (sum_a, sum_b) in sums.items():
            A, B = update.lora[module].A, update.lora[module].B
            torch.mm(A, reference.lora[module].A.T, out=cross)
            torch.mm(rotation.T, A, out=terms[Factor.A])
            sum_a.add_(scratch[Factor.A].copy_(terms[Factor.A]))
            torch.mm(B, rotation, out=terms[Factor.B])
            sum_b.add_(scratch[Factor.B].copy_(terms[Factor.B]))


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
    states = [u.to_state_dict() for u in updates]
    buffers = {key: torch.empty_like(t) for key, t in states[0].items()}
    candidates: dict[str, Callable[[], object]] = {
        "fedrot_s": lambda: run_streaming("fedrot", reference, updates, lam, device),
        "loop_s": lambda: run_loop(reference, updates, lam),
        "fedit_s": lambda: run_plain_fedit(updates),
        "plain_inplace_s": lambda: run_plain_inplace(states, buffers),
        "fedit_streaming_s": lambda: run_streaming("fedit", reference, updates, lam, device),
        "gemm_floor_s": lambda: run_gemm_floor(reference, updates),
        "gemm_floor_exact_s": lambda: run_gemm_floor_exact(reference, updates),
    }
    out = best_times(candidates, repeats, device)
    out["fedrot_tracked_s"] = timed(
        lambda: run_streaming("fedrot", reference, updates, lam, device, True), device
    )
    out["max_rel_diff_vs_loop"] = max_relative_difference(fedrot, loop)
    out["speedup_vs_loop"] = out["loop_s"] / out["fedrot_s"]
    out["ratio_vs_fedit"] = out["fedrot_s"] / out["fedit_s"]
    out["ratio_vs_plain"] = out["fedrot_s"] / out["plain_inplace_s"]
    out["ratio_vs_fedit_streaming"] = out["fedrot_s"] / out["fedit_streaming_s"]
    out["floor_ratio_vs_fedit"] = out["gemm_floor_s"] / out["fedit_s"]
    out["ratio_vs_floor_exact"] = out["fedrot_s"] / out["gemm_floor_exact_s"]
    return out


def error_precision(shape: Shape, device: str, lam: float) -> dict[str, float]:
    """How the tracked error's paths agree on this shape's round (``shape.clients`` updates):
    the largest relative difference over the modules' three norms between the dense path with
    a float32 ``Q`` and with a float64 one, and between the Gram path and the float64 dense
    one."""
    import fedrot.error_tracking as tracking

    reference = make_reference(shape, device)
    updates = [make_update(reference, shape, i, device) for i in range(shape.clients)]
    norms = {}
    settings = {
        "gram": (float("inf"), torch.float32),
        "dense32": (0.0, torch.float32),
        "dense64": (0.0, torch.float64),
    }
    saved = tracking.GRAM_BUDGET, tracking.DENSE_DTYPE
    try:
        for name, (budget, dtype) in settings.items():
            tracking.GRAM_BUDGET, tracking.DENSE_DTYPE = budget, dtype
            strategy = build_strategy("fedrot", StrategyConfig(lam=lam))
            aggregator = strategy.start_round(reference, strategy.plan(ROUND), device=device)
            for i, update in enumerate(updates):
                aggregator.add(f"client-{i}", update, 1.0 + i % 3)
            modules = aggregator.finalize().report.modules
            norms[name] = [
                (m.aggregation_error, m.update_norm, m.factor_average_error) for m in modules
            ]
    finally:
        tracking.GRAM_BUDGET, tracking.DENSE_DTYPE = saved

    def worst(got: list, expected: list) -> float:
        pairs = [(a, b) for g, e in zip(got, expected) for a, b in zip(g, e)]
        return max(abs(a - b) / abs(b) for a, b in pairs)

    return {
        "error_dense32_vs_dense64": worst(norms["dense32"], norms["dense64"]),
        "error_gram_vs_dense64": worst(norms["gram"], norms["dense64"]),
    }


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_peak(shape: Shape, clients: int, device: str, lam: float) -> float:
    """Peak memory (MiB) of one streaming FedRot round (``track_error=False``) above the
    set-up baseline; the updates are made one at a time, as a server receives them."""
    reference = make_reference(shape, device)
    warm = make_update(reference, shape, 0, device)  # first-use allocations of the generator
    del warm
    updates = (make_update(reference, shape, i, device) for i in range(clients))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_streaming("fedrot", reference, updates, lam, device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    base = _resident_kib("VmRSS")
    run_streaming("fedrot", reference, updates, lam, device)
    return (_resident_kib("VmHWM") - base) / 1024


def measure_tracked(
    shape: Shape, clients: int, device: str, lam: float, gram_budget: float | None = None
) -> dict[str, float]:
    """One ``track_error=True`` FedRot round of ``clients`` updates (cycling through a pool of
    distinct ones made before the baseline): its time (every ``add`` and ``finalize``), its
    peak memory (MiB) above the baseline and the most its scratch files held on disk (MiB).
    ``gram_budget`` overrides :data:`fedrot.error_tracking.GRAM_BUDGET` (0: the dense path
    from the first client)."""
    if gram_budget is not None:
        import fedrot.error_tracking

        fedrot.error_tracking.GRAM_BUDGET = gram_budget
    spilled = _count_spilled_bytes()
    reference = make_reference(shape, device)
    pool = [make_update(reference, shape, i, device) for i in range(min(clients, UPDATE_POOL))]
    updates = (pool[i % len(pool)] for i in range(clients))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        seconds = timed(
            lambda: run_streaming("fedrot", reference, updates, lam, device, True), device
        )
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return {"seconds": seconds, "peak_mb": peak, "scratch_mb": spilled[0] / 2**20}
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    base = _resident_kib("VmRSS")
    seconds = timed(lambda: run_streaming("fedrot", reference, updates, lam, device, True), device)
    peak = (_resident_kib("VmHWM") - base) / 1024
    return {"seconds": seconds, "peak_mb": peak, "scratch_mb": spilled[0] / 2**20}


def _count_spilled_bytes() -> list[int]:
    """A one-item list that follows the bytes appended to every scratch file of the process
    (:class:`fedrot.factor_spill.FactorSpill`; a tracked round's files all live until its
    ``finalize``)."""
    from fedrot.factor_spill import FactorSpill

    total = [0]
    append = FactorSpill.append

    def counted(self: FactorSpill, rows: object) -> None:
        before = self.nbytes()
        append(self, rows)  # type: ignore[arg-type]
        total[0] += self.nbytes() - before

    FactorSpill.append = counted  # type: ignore[method-assign]
    return total


def in_subprocess(args: argparse.Namespace, mode: str, shape: str, clients: int) -> str:
    """The last line that ``--MODE SHAPE N`` prints in a fresh interpreter."""
    budget = [] if args.gram_budget is None else ["--gram-budget", str(args.gram_budget)]
    command = [
        sys.executable,
        __file__,
        mode,
        shape,
        str(clients),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--lam",
        str(args.lam),
        *budget,
    ]
    # A fixed mmap threshold: every large block is mapped on allocation and unmapped on free,
    # so the RSS peak reflects live tensors rather than glibc's adaptive heap growth.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(4096))
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return done.stdout.strip().splitlines()[-1]


def benchmark(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    for name in args.shapes:
        shape = SHAPES[name]
        row: dict[str, object] = dict(time_shape(shape, args.device, args.lam, args.repeats))
        for clients in MEMORY_CLIENTS:
            row[f"peak_mb_n{clients}"] = float(in_subprocess(args, "--peak", name, clients))
        if args.precision:
            row.update(error_precision(shape, args.device, args.lam))
        if not args.skip_tracked:
            for clients in args.clients_tracked:
                tracked = json.loads(in_subprocess(args, "--tracked-round", name, clients))
                row[f"peak_mb_n{clients}_tracked"] = tracked["peak_mb"]
                row[f"fedrot_tracked_s_n{clients}"] = tracked["seconds"]
                row[f"scratch_mb_n{clients}_tracked"] = tracked["scratch_mb"]
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
        "plain_inplace_s",
        "gemm_floor_s",
        "gemm_floor_exact_s",
        "fedrot_tracked_s",
        "speedup_vs_loop",
        "ratio_vs_fedit",
        "ratio_vs_fedit_streaming",
        "ratio_vs_plain",
        "floor_ratio_vs_fedit",
        "ratio_vs_floor_exact",
        "peak_mb_n5",
        "peak_mb_n50",
        "max_rel_diff_vs_loop",
        "error_dense32_vs_dense64",
        "error_gram_vs_dense64",
    ]
    names = list(results)
    keys += sorted(
        {k for row in results.values() for k in row if "tracked_s_n" in k or "_tracked" in k}
        - set(keys),
        key=lambda k: (k.split("_n")[0], int(k.rsplit("_n", 1)[1].split("_")[0])),
    )
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
        "--skip-tracked", action="store_true", help="skip the track_error=True rounds"
    )
    parser.add_argument(
        "--clients-tracked",
        type=_client_counts,
        default=TRACKED_CLIENTS,
        help="N of the track_error=True rounds, comma-separated (default 5,50,200)",
    )
    parser.add_argument(
        "--gram-budget",
        type=float,
        default=None,
        help="override fedrot.error_tracking.GRAM_BUDGET in the tracked rounds (0: always dense)",
    )
    parser.add_argument(
        "--precision",
        action="store_true",
        help="also compare the tracked error's Gram, float32 dense and float64 dense paths",
    )
    parser.add_argument("--peak", nargs=2, metavar=("SHAPE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--tracked-round", nargs=2, metavar=("SHAPE", "N"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _client_counts(text: str) -> tuple[int, ...]:
    counts = tuple(int(part) for part in text.split(",") if part.strip())
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive counts like 5,50,200, got {text!r}")
    return counts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.peak:
        shape, clients = SHAPES[args.peak[0]], int(args.peak[1])
        print(measure_peak(shape, clients, args.device, args.lam))
        return
    if args.tracked_round:
        shape, clients = SHAPES[args.tracked_round[0]], int(args.tracked_round[1])
        tracked = measure_tracked(shape, clients, args.device, args.lam, args.gram_budget)
        print(json.dumps(tracked))
        return
    results = benchmark(args)
    if args.json:
        print(json.dumps(results))
        return
    print_table(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
