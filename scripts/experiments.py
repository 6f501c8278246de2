"""``make experiments``: the small-scale reproduction of FedRot-LoRA's comparison (docs/results.md).

all-MiniLM-L6-v2 on WordNet gloss classification (45 classes), LoRA r = 4 on query/value with a
trainable head, plain SGD, label-Dirichlet shards; every run is one ``fedrot simulate`` federation
(in this process, one after another). Runs go seed by seed through every setting, so a partial
grid still compares every strategy; a run whose ``metrics.json`` holds a summary is skipped, so
an interrupted grid resumes where it stopped. ``report`` turns the finished runs into the tables
(``tables.md``) and plots (``docs/img``).

    python scripts/experiments.py run [--quick] [--out experiments/runs] [--only SETTING ...]
                                      [--seeds K ...]
    python scripts/experiments.py report [--out experiments/runs] [--img docs/img]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger("experiments")


@dataclass(frozen=True)
class Method:
    """A strategy as it appears in the tables: ``label`` and its ``fedrot simulate`` flags
    (``align_first``: the factor FedRot aligns in round 1)."""

    label: str
    strategy: str
    lam: float = 0.4
    align_first: str = "A"

    @property
    def slug(self) -> str:
        """Its runs' folder name: ``fedit``, ``fedrot-lam0.4``, ``fedrot-B-lam1``, ..."""
        if self.strategy != "fedrot":
            return self.strategy
        schedule = "" if self.align_first == "A" else f"{self.align_first}-"
        return f"fedrot-{schedule}lam{self.lam:g}"


@dataclass(frozen=True)
class Setting:
    """One (N, alpha) cell and the methods run there."""

    clients: int
    alpha: float
    methods: tuple[Method, ...]
    client_basis: str = "shared"
    rounds: int | None = None  # None: the budget's

    @property
    def name(self) -> str:
        suffix = "" if self.client_basis == "shared" else f"-{self.client_basis}"
        suffix += "" if self.rounds is None else f"-{self.rounds}rounds"
        return f"N{self.clients}-alpha{self.alpha:g}{suffix}"


@dataclass(frozen=True)
class Budget:
    """Local training and data sizes shared by every run."""

    rounds: int = 16
    local_steps: int = 10
    batch_size: int = 8
    lr: float = 0.4
    max_length: int = 32
    per_client: int = 300
    eval_size: int = 200
    eval_every: int = 2


FEDIT = Method("FedIT", "fedit")
FULL = (
    FEDIT,
    Method("FedRot λ=0.2", "fedrot", 0.2),
    Method("FedRot λ=0.4", "fedrot", 0.4),
    Method("FedRot λ=0.6", "fedrot", 0.6),
    Method("FedRot λ=1.0", "fedrot", 1.0),
    Method("FFA-LoRA", "ffa"),
    Method("RoLoRA", "rolora"),
    Method("FlexLoRA", "flexlora"),
)
REDUCED = (FEDIT, Method("FedRot λ=0.4", "fedrot", 0.4))
N10_SKEWED = (*REDUCED, Method("RoLoRA", "rolora"))
BASES = (FEDIT, Method("FedRot λ=0.4", "fedrot", 0.4), Method("FedRot λ=1.0", "fedrot", 1.0))


@dataclass(frozen=True)
class Phase:
    """Settings run seed by seed; phases run in order, so the most informative finish first."""

    settings: tuple[Setting, ...]
    seeds: tuple[int, ...] = (0, 1, 2)


# The full method set in the paper's main setting (N = 3, alpha = 0.5); FedIT vs FedRot with strong
# skew (alpha = 0.1); clients that report their factors in their own random basis (the stress
# test of fedrot_client.simulation.client_basis); with 10 clients FedIT, FedRot and the paper's
# strongest baseline (RoLoRA); and three times the rounds (N = 3, alpha = 0.5), where the
# 16-round curves had not flattened.
# A round with N = 10 costs 10/3 of one with N = 3: on a shared 2-core machine the N = 10 cells
# run with fewer methods, and their later seeds only when time is left (docs/results.md).
GRID = (
    Phase((Setting(3, 0.5, FULL),)),
    Phase((Setting(3, 0.1, REDUCED),)),
    Phase((Setting(3, 0.5, BASES, client_basis="haar"),)),
    Phase((Setting(3, 0.5, BASES, rounds=48),)),
    Phase((Setting(10, 0.1, N10_SKEWED), Setting(10, 0.5, REDUCED)), seeds=(0,)),
    Phase((Setting(10, 0.1, N10_SKEWED), Setting(10, 0.5, REDUCED)), seeds=(1, 2)),
)
QUICK_GRID = (Phase((Setting(3, 0.5, (*REDUCED, Method("RoLoRA", "rolora"))),), seeds=(0,)),)
QUICK_BUDGET = Budget(rounds=4, local_steps=3, per_client=100, eval_size=100)


def select(grid: Sequence[Phase], only: Sequence[str] | None,
           seeds: Sequence[int] | None) -> tuple[Phase, ...]:
    """The part of ``grid`` with the settings named in ``only`` and the ``seeds`` (None: all)."""
    names = {setting.name for phase in grid for setting in phase.settings}
    if unknown := set(only or ()) - names:
        raise SystemExit(f"unknown settings {sorted(unknown)}; the grid has {sorted(names)}")
    phases = (Phase(tuple(s for s in phase.settings if only is None or s.name in only),
                    tuple(k for k in phase.seeds if seeds is None or k in seeds))
              for phase in grid)  # fmt: skip
    return tuple(phase for phase in phases if phase.settings and phase.seeds)


def run_dir(out: Path, setting: Setting, method: Method, seed: int) -> Path:
    return out / setting.name / method.slug / f"seed{seed}"


def finished(folder: Path, config: Mapping[str, object]) -> bool:
    """Whether ``folder`` holds a complete run of ``config``: every setting the run recorded has
    the value it would have now (a run with another budget, say a quick one, is run again; a
    setting added to the simulator since, with its former behaviour, is not recorded)."""
    path = folder / "metrics.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(dict(config)))
    return saved.get("summary") is not None and _recorded_in(saved.get("config"), current)


def _recorded_in(saved: object, current: object) -> bool:
    if isinstance(saved, dict) and isinstance(current, dict):
        return all(k in current and _recorded_in(v, current[k]) for k, v in saved.items())
    return saved == current


def run_grid(out: Path, grid: Sequence[Phase], budget: Budget, model: str) -> None:
    """Every (phase, seed, setting, method) run not yet finished, in that order."""
    import torch

    from fedrot_client.lora import LoraSpec
    from fedrot_client.models import ModelSpec
    from fedrot_client.simulation.command import simulate_to
    from fedrot_client.simulation.config import SimulationConfig
    from fedrot_client.simulation.federated_data import wordnet_federation

    torch.set_num_threads(1)
    cells = [(seed, setting) for phase in grid for seed in phase.seeds
             for setting in phase.settings]  # fmt: skip
    for seed, setting in cells:
        data = wordnet_federation(setting.clients, alpha=setting.alpha, seed=seed,
                                  eval_size=budget.eval_size, per_client=budget.per_client)
        base = SimulationConfig(
            model=ModelSpec(model, num_labels=45, seed=seed), lora=LoraSpec(r=4, alpha=8.0),
            num_clients=setting.clients, rounds=setting.rounds or budget.rounds,
            local_steps=budget.local_steps, batch_size=budget.batch_size, lr=budget.lr,
            max_length=budget.max_length, eval_every=budget.eval_every, seed=seed,
            client_basis=setting.client_basis, num_threads=1,
            extra={"alpha": setting.alpha, "per_client": budget.per_client,
                   "eval_size": budget.eval_size, "setting": setting.name,
                   "client_basis": setting.client_basis},
        )  # fmt: skip
        for method in setting.methods:
            folder = run_dir(out, setting, method, seed)
            config = replace(base, strategy=method.strategy, lam=method.lam,
                             extra={**base.extra, "label": method.label})  # fmt: skip
            if finished(folder, config.to_dict()):
                continue
            started = time.perf_counter()
            result = simulate_to(folder, config, data, plot=False)
            summary = result.summary()
            logger.info("%s %s seed %s: best %.4f final %.4f (%.0f s)", setting.name,
                        method.label, seed, summary["best_accuracy"],
                        summary["final_accuracy"], time.perf_counter() - started)  # fmt: skip


GENERATIVE_METHODS = (FEDIT, Method("FedRot λ=0.4", "fedrot", 0.4))
GENERATIVE_SETTING = Setting(3, 0.5, GENERATIVE_METHODS)
GENERATIVE_BUDGET = Budget(rounds=5, local_steps=6, batch_size=4, lr=0.05, max_length=32,
                           per_client=200, eval_size=60, eval_every=1)  # fmt: skip


GENERATIVE_LONG_BUDGET = replace(GENERATIVE_BUDGET, rounds=15)
"""Three times the rounds, seed 0 only: whether the 5-round curves' gap holds."""


def run_generative(out: Path, budget: Budget, seeds: Sequence[int], model: str) -> None:
    """SmolLM2-135M learns ``"word: gloss"`` (WordNet) with LoRA r = 8 on q_proj / v_proj;
    FedIT vs FedRot, held-out perplexity every round."""
    import torch

    from fedrot_client.lora import LoraSpec
    from fedrot_client.models import ModelSpec
    from fedrot_client.simulation.command import simulate_to
    from fedrot_client.simulation.config import SimulationConfig
    from fedrot_client.simulation.federated_data import WordNetTask, wordnet_federation

    torch.set_num_threads(1)
    setting = GENERATIVE_SETTING
    for seed in seeds:
        data = wordnet_federation(setting.clients, alpha=setting.alpha, seed=seed,
                                  eval_size=budget.eval_size, per_client=budget.per_client,
                                  task=WordNetTask.GLOSSES)  # fmt: skip
        for method in setting.methods:
            folder = run_dir(out, setting, method, seed)
            config = SimulationConfig(
                model=ModelSpec(model, task="causal-lm", seed=seed),
                lora=LoraSpec(r=8, alpha=16.0, target_modules=("q_proj", "v_proj")),
                strategy=method.strategy, lam=method.lam, num_clients=setting.clients,
                rounds=budget.rounds, local_steps=budget.local_steps,
                batch_size=budget.batch_size, lr=budget.lr, max_length=budget.max_length,
                eval_batch_size=30, eval_every=budget.eval_every, seed=seed, num_threads=1,
                extra={"alpha": setting.alpha, "label": method.label, "setting": "generative"},
            )  # fmt: skip
            if finished(folder, config.to_dict()):
                continue
            started = time.perf_counter()
            summary = simulate_to(folder, config, data, plot=False).summary()
            logger.info("generative %s seed %s: best ppl %.2f final %.2f (%.0f s)", method.label,
                        seed, summary["best_perplexity"], summary["final_perplexity"],
                        time.perf_counter() - started)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["run", "generative", "report", "all"])
    parser.add_argument("--out", type=Path, default=Path("experiments/runs"))
    parser.add_argument("--img", type=Path, default=Path("docs/img"))
    parser.add_argument("--quick", action="store_true", help="a 3-run smoke version (~2 min)")
    parser.add_argument("--model", default=None, help="default: minilm (smollm2 generative)")
    parser.add_argument("--only", nargs="+", metavar="SETTING",
                        help="run only these settings (e.g. N3-alpha0.1 N3-alpha0.5-haar)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="run only these seeds (default: the grid's; generative: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    logging.getLogger("fedrot_client").setLevel(logging.WARNING)
    grid, budget = (QUICK_GRID, QUICK_BUDGET) if args.quick else (GRID, Budget())
    if args.action in ("run", "all"):
        run_grid(args.out, select(grid, args.only, args.seeds), budget, args.model or "minilm")
    if args.action in ("generative", "all") and not args.quick:
        run_generative(args.out / "generative", GENERATIVE_BUDGET, args.seeds or [0],
                       args.model or "smollm2")
        run_generative(args.out / "generative-15rounds", GENERATIVE_LONG_BUDGET, [0],
                       args.model or "smollm2")
    if args.action in ("report", "all"):
        from experiment_report import write_report

        write_report(args.out, args.img, budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
