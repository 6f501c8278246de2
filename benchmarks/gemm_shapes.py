"""How fast this CPU multiplies the matrices a FedRot round is made of (not a test).

A llama_7b-like FedRot round (r = 16, d = 4096) is three skinny GEMMs per module and client:
``M = A_i A_ref^T`` ``(16 x 4096) @ (4096 x 16)``, ``R^T A_i`` ``(16 x 16) @ (16 x 4096)`` and
``B_i R`` ``(4096 x 16) @ (16 x 16)``, the last two accumulated in place. This prints the
single-thread GFLOPS of each, from a hot cache, through torch's default BLAS (``torch.mm`` /
``addmm_``) and through oneDNN (``mkldnn_linear`` on tensors already in its layout, conversions
not timed), next to a square 512 GEMM for the library's peak. It also times the three on
64 modules one after another, each operand its own tensor, as in the benchmark's round, where
the data no longer fits in the caches.

    .venv/bin/python benchmarks/gemm_shapes.py [--json] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

R, D, MODULES = 16, 4096, 64


def gflops(fn: Callable[[], object], flop: float, repeats: int) -> float:
    """Best-of-``repeats`` rate of ``fn`` (after one warm-up call) in GFLOP/s."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flop / best / 1e9


def hot_shapes(repeats: int) -> dict[str, float]:
    a, ref, rot = torch.randn(R, D), torch.randn(R, D), torch.randn(R, R)
    b, sum_a, sum_b = torch.randn(D, R), torch.randn(R, D), torch.randn(D, R)
    skinny, cube = 2.0 * R * R * D, 2.0 * 512**3
    square = torch.randn(512, 512)
    dnn_b, dnn_r = b.to_mkldnn(), rot.to_mkldnn()
    dnn_square = square.to_mkldnn()
    linear = torch._C._nn.mkldnn_linear
    return {
        "blas_square_512": gflops(lambda: square @ square, cube, repeats),
        "blas_cross": gflops(lambda: torch.mm(a, ref.mT), skinny, repeats),
        "blas_rotate_a": gflops(lambda: sum_a.addmm_(rot.mT, a, beta=0.5), skinny, repeats),
        "blas_rotate_b": gflops(lambda: sum_b.addmm_(b, rot, beta=0.5), skinny, repeats),
        "onednn_square_512": gflops(lambda: linear(dnn_square, dnn_square, None), cube, repeats),
        "onednn_rotate_b": gflops(lambda: linear(dnn_b, dnn_r, None), skinny, repeats),
    }


def round_of_modules(repeats: int) -> float:
    """GFLOP/s of the three GEMMs over 64 separate modules, as one client's update in a round."""
    a = [torch.randn(R, D) for _ in range(MODULES)]
    b = [torch.randn(D, R) for _ in range(MODULES)]
    ref = [torch.randn(R, D) for _ in range(MODULES)]
    sum_a = [torch.randn(R, D) for _ in range(MODULES)]
    sum_b = [torch.randn(D, R) for _ in range(MODULES)]
    rot = torch.randn(R, R)
    cross = torch.empty(R, R)

    def update() -> None:
        for k in range(MODULES):
            torch.mm(a[k], ref[k].mT, out=cross)
            sum_a[k].addmm_(rot.mT, a[k], beta=0.5)
            sum_b[k].addmm_(b[k], rot, beta=0.5)

    return gflops(update, 3 * 2.0 * R * R * D * MODULES, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=30, help="best of this many (default 30)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = hot_shapes(args.repeats)
    results["blas_three_gemms_64_modules"] = round_of_modules(max(3, args.repeats // 5))
    if not args.json:
        for name, value in results.items():
            print(f"{name:30s} {value:8.1f} GFLOP/s")
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))


if __name__ == "__main__":
    main()
