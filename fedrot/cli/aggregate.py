"""``fedrot aggregate``: merge client adapter files with one strategy, offline.

::

    fedrot aggregate --strategy {fedit,fedrot,...} [--lambda L] [--align {A,B}] \\
        [--reference REF.safetensors] --out OUT.safetensors [--report REPORT.json] \\
        [--base-deltas DELTAS.safetensors] CLIENT.safetensors[:WEIGHT] ...

Inputs and output are PEFT adapter state dicts in safetensors (``<module>.lora_A.weight``
``(r, d_in)``, ``<module>.lora_B.weight`` ``(d_out, r)``, extras such as a classifier head).
Every client is checked against the schema of the reference (or of the heaviest client), then
added to one streaming aggregator, one file at a time, with its normalised weight. Without
``--reference`` the heaviest client (ties: the first path in sort order) is the one the others
are aligned to, so the result does not depend on the order of the arguments. The output holds
the aggregated tensors under the input keys, in the first client's dtypes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedrot.adapters import BOTH_FACTORS, Adapter, AdapterSchema, Factor
from fedrot.aggregation import AggregationResult, RoundAggregator
from fedrot.cli.files import (
    InputError,
    WeightedPath,
    parse_weighted_path,
    read_adapter_file,
    write_file,
)
from fedrot.codec import encode_adapter
from fedrot.errors import FedRotError
from fedrot.strategies import (
    RoundPlan,
    Strategy,
    StrategyConfig,
    StrategyName,
    build_strategy,
    strategy_names,
)

logger = logging.getLogger(__name__)

ROUND_INDEX = 1
"""The round the offline plan claims: the first one that aligns (round 0 never does)."""

OVERFLOW = "the inputs' values overflow float32 in the aggregation; nothing was written"

BASE_DELTA_SUFFIX = ".base_layer.weight"
"""Key suffix of a FedEx-LoRA residual: PEFT's name for the wrapped base weight it adds to."""


DESCRIPTION = (
    "Aggregate client LoRA adapters (safetensors, PEFT key names) with one strategy. Each "
    "client may carry a weight after its last ':' (default 1; weights are normalised). Every "
    "client is checked against the schema of the reference, or of the heaviest client. The "
    "rotation strategies align every client to --reference, the adapter the clients started "
    "from; without it, to the heaviest client (ties: the first path in sort order). With "
    "--reference, ffa keeps its lora_A factors and clients may omit them. Bad input ends with "
    "one 'fedrot: error:' line and exit status 2."
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``aggregate`` and its options on the top-level subparsers."""
    parser = subparsers.add_parser(
        "aggregate",
        help="aggregate client LoRA adapters (safetensors, PEFT keys) with one strategy",
        description=DESCRIPTION,
    )
    names = [str(n) for n in strategy_names()]
    parser.add_argument(
        "--strategy", required=True, choices=names, metavar="{" + ",".join(names) + "}"
    )
    parser.add_argument(
        "--lambda", dest="lam", type=parse_lambda, default=StrategyConfig().lam, metavar="L",
        help="alignment strength in [0, 1] for the rotation strategies (default %(default)s)",
    )
    parser.add_argument(
        "--align", type=str.upper, choices=[str(f) for f in Factor], default=str(Factor.A),
        help="the factor the rotation strategies align (default %(default)s); others ignore it",
    )
    parser.add_argument("--reference", type=Path, metavar="REF.safetensors",
                        help="the adapter broadcast at the round's start (enables relative errors)")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT.safetensors",
                        help="the aggregated adapter: the input keys, the first client's dtypes")
    parser.add_argument("--report", type=Path, metavar="REPORT.json",
                        help="write the aggregation report (errors per module and client) as JSON")
    parser.add_argument("--base-deltas", type=Path, metavar="DELTAS.safetensors",
                        help="fedex only: write the residual sum p_i B_i A_i - B_bar A_bar per "
                        "module, float32, under <module>" + BASE_DELTA_SUFFIX + " (product units: "
                        "multiply by alpha / r before adding to the base weight)")
    parser.add_argument("--device", type=parse_device, default=torch.device("cpu"),
                        help="where to aggregate: cpu (default) or cuda[:N]")
    parser.add_argument("clients", nargs="+", metavar="CLIENT.safetensors[:WEIGHT]",
                        help="client adapters; WEIGHT (after the last ':') defaults to 1")
    parser.set_defaults(run=run)


def parse_lambda(text: str) -> float:
    """argparse type of ``--lambda``: a finite number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text!r}")
    return value


def parse_device(text: str) -> torch.device:
    """argparse type of ``--device``: a torch device that exists on this machine."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda are supported")
    return device


def run(args: argparse.Namespace) -> int:
    """Aggregate, write the outputs, print a one-line summary; InputError on bad input."""
    if args.base_deltas is not None and args.strategy != StrategyName.FEDEX:
        raise InputError(
            f"--base-deltas: only --strategy {StrategyName.FEDEX} has base-weight residuals"
        )
    clients = [parse_weighted_path(a) for a in args.clients]
    config = StrategyConfig(lam=args.lam, align_first=Factor(args.align))
    strategy = build_strategy(args.strategy, config)
    reference = _read_reference(args.reference)
    plan = offline_plan(strategy, reference_given=reference is not None)
    aggregator = strategy.start_round(reference, plan, device=args.device, track_error=True)
    weights = normalised_weights(clients)
    layout = _add_clients(aggregator, clients, weights, plan, reference)
    try:
        result = aggregator.finalize()
    except torch.linalg.LinAlgError:
        raise InputError(OVERFLOW) from None
    metadata = _metadata(args, plan, len(clients))
    outputs = {args.out: encode_adapter(_in_layout(result.adapter, layout), metadata)}
    if args.base_deltas is not None:
        outputs[args.base_deltas] = encode_adapter(base_delta_tensors(result), metadata)
    if args.report is not None:
        outputs[args.report] = _report_json(args, clients, weights, result).encode()
    for path, data in outputs.items():
        write_file(path, data)
    print(summary_line(args, result))
    return 0


def offline_plan(strategy: Strategy, reference_given: bool) -> RoundPlan:
    """The round the command aggregates. Aligned: the strategy's factor of an aligning round
    (``--align``, through ``StrategyConfig.align_first``), None for strategies that never
    align. Trained: with a reference, the factors the strategy trains in every round (FFA-LoRA:
    B; the reference keeps the rest); else, or when that changes by round (RoLoRA), both."""
    first, second = strategy.plan(ROUND_INDEX), strategy.plan(ROUND_INDEX + 1)
    steady = first.trained & second.trained
    trained = steady if reference_given and steady else BOTH_FACTORS
    return RoundPlan(ROUND_INDEX, trained, first.aligned)


def _read_reference(path: Path | None) -> Adapter | None:
    if path is None:
        return None
    return _as_adapter(path, read_adapter_file(path).tensors)


def _as_adapter(path: Path, tensors: dict[str, Tensor]) -> Adapter:
    try:
        return Adapter.from_state_dict(tensors)
    except FedRotError as exc:
        raise InputError(f"{path}: {exc}") from None


def _add_clients(
    aggregator: RoundAggregator,
    clients: Sequence[WeightedPath],
    weights: Sequence[float],
    plan: RoundPlan,
    reference: Adapter | None,
) -> dict[str, torch.dtype]:
    """Decode, check and add each client file in turn (one in memory at a time), with its
    normalised weight from ``weights``; without a reference the heaviest client goes first (the aggregator
    aligns to the first update it gets).

    Returns the output's keys and dtypes: the first client's, then the reference's for keys
    the clients left out (FFA-LoRA's frozen A).
    """
    schema = None if reference is None else AdapterSchema.of(reference)
    order = range(len(clients)) if reference is not None else aggregation_order(clients)
    ids = client_ids(clients)
    layout: dict[str, torch.dtype] = {}
    for index in order:
        client = clients[index]
        decoded = read_adapter_file(
            client.path, schema, plan.trained, optional=BOTH_FACTORS - plan.trained
        )
        if reference is None:
            adapter = _as_adapter(client.path, decoded.tensors)
            schema = schema or AdapterSchema.of(adapter)
        else:
            adapter = reference.with_factors_from(decoded.tensors)
        if index == 0:
            layout = {key: t.dtype for key, t in decoded.tensors.items()}
        try:
            aggregator.add(ids[index], adapter, weights[index])
        except torch.linalg.LinAlgError:
            raise InputError(f"{client.path}: {OVERFLOW}") from None
        except (FedRotError, ValueError) as exc:
            raise InputError(f"{client.path}: {exc}") from None
        logger.debug("added %s with weight %s", ids[index], weights[index])
    if reference is not None:
        for key, tensor in reference.to_state_dict().items():
            layout.setdefault(key, tensor.dtype)
    return layout


def normalised_weights(clients: Sequence[WeightedPath]) -> list[float]:
    """The clients' weights summing to 1 (scaled by the largest first, so that huge weights
    cannot overflow the sum)."""
    largest = max(c.weight for c in clients)
    scaled = [c.weight / largest for c in clients]
    total = math.fsum(scaled)
    normalised = [w / total for w in scaled]
    if not all(normalised):
        lightest = min(clients, key=lambda c: c.weight)
        raise InputError(f"{lightest.path}: weight {lightest.weight:g} is too small next to "
                         f"{largest:g} to count at all")  # fmt: skip
    return normalised


def aggregation_order(clients: Sequence[WeightedPath]) -> list[int]:
    """The argument order with the heaviest client (ties: the first path in sort order) moved
    first: a choice of the alignment target that the order of the arguments does not change."""
    first = min(range(len(clients)), key=lambda i: (-clients[i].weight, str(clients[i].path)))
    return [first, *(i for i in range(len(clients)) if i != first)]


def client_ids(clients: Sequence[WeightedPath]) -> list[str]:
    """Each client's name in the report: its path, ``#2``, ``#3``... for repeats."""
    seen: dict[Path, int] = {}
    ids = []
    for client in clients:
        seen[client.path] = seen.get(client.path, 0) + 1
        count = seen[client.path]
        ids.append(str(client.path) if count == 1 else f"{client.path}#{count}")
    return ids


def _finite(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors``, when all finite; else the overflow InputError naming the first bad key."""
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{key}: {OVERFLOW}")
    return tensors


def _in_layout(adapter: Adapter, layout: dict[str, torch.dtype]) -> dict[str, Tensor]:
    """The aggregate as a PEFT state dict in the first client's key order and dtypes."""
    tensors = adapter.to_state_dict()
    return _finite({k: tensors[k].to(device="cpu", dtype=dtype) for k, dtype in layout.items()})


def base_delta_tensors(result: AggregationResult) -> dict[str, Tensor]:
    """FedEx-LoRA's residuals ``(d_out, d_in)`` float32 under ``<module>.base_layer.weight``."""
    return _finite({
        module + BASE_DELTA_SUFFIX: delta.to(device="cpu", dtype=torch.float32)
        for module, delta in result.base_deltas.items()
    })  # fmt: skip


def _metadata(args: argparse.Namespace, plan: RoundPlan, num_clients: int) -> dict[str, str]:
    return {
        "format": "pt",
        "fedrot.strategy": str(args.strategy),
        "fedrot.lambda": repr(args.lam),
        "fedrot.aligned": "" if plan.aligned is None else str(plan.aligned),
        "fedrot.num_clients": str(num_clients),
    }


def _report_json(
    args: argparse.Namespace,
    clients: Sequence[WeightedPath],
    weights: Sequence[float],
    result: AggregationResult,
) -> str:
    report: dict[str, Any] = result.report.to_dict()
    report["inputs"] = [
        {"path": str(c.path), "weight": c.weight, "normalised_weight": p}
        for c, p in zip(clients, weights, strict=True)
    ]
    report["reference"] = None if args.reference is None else str(args.reference)
    report["output"] = str(args.out)
    try:
        return json.dumps(report, indent=2, allow_nan=False) + "\n"
    except ValueError:  # an error term beyond float32
        raise InputError(f"{args.report}: {OVERFLOW}") from None


def summary_line(args: argparse.Namespace, result: AggregationResult) -> str:
    """One line: what was aggregated, into where, with which error."""
    report = result.report
    aligned = "" if report.aligned is None else f", aligned {report.aligned}, lambda {args.lam:g}"
    line = (
        f"fedrot: aggregated {report.num_clients} adapters with {args.strategy}{aligned} "
        f"into {args.out}"
    )
    if report.aggregation_error is not None:
        line += f"; aggregation error {report.aggregation_error:.4g}"
    if report.relative_aggregation_error is not None:
        line += f" (relative {report.relative_aggregation_error:.4g})"
    return line
