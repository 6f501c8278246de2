"""``make regime-search``: where is FedRot-LoRA's aggregation error at least 2x below FedIT's?

A one-factor-at-a-time sweep around one base setting (all-MiniLM-L6-v2 on WordNet, N = 3,
label-Dirichlet alpha = 0.5, LoRA r = 4 (alpha = 2r), plain SGD lr 0.4, 10 local steps of
batch 8, 2 rounds, held-out accuracy after the last round only). Each setting changes one thing
(local steps, optimiser, learning rate, rank, clients, alpha, partial participation, stale
updates, clients' own initial LoRA, clients' own reporting basis, and the instruction-tuning task:
SmolLM2-135M-Instruct on reverse-dictionary chats, held-out exact match) and runs FedIT and FedRot
(lambda = 1 and 0.4) with the same seed. Round 0 is never aligned, so in a two-round run every
strategy trains the same updates: each setting trains once and aggregates round 1 with every
strategy (``regime_rounds.py``; the records equal separate ``fedrot simulate`` runs). The ratio
FedIT / FedRot of round 1's relative aggregation error is therefore a paired comparison on
identical uploads. Settings run one after another in this process with one torch thread; a run
whose ``metrics.json`` holds a summary of the same config is skipped, so an interrupted sweep
resumes. ``report`` writes ``summary.json`` and ``table.md`` under ``--out`` and the plots
``regime_*.png`` under ``--img`` (docs/results.md, "When does alignment pay?").

    python scripts/regime_search.py run [--out experiments/regime] [--only NAME ...]
    python scripts/regime_search.py report [--out experiments/regime] [--img docs/img]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# scripts/ is on sys.path when run as a script
from experiments import Method, finished  # noqa: E402

logger = logging.getLogger("regime_search")


FEDIT = Method("FedIT", "fedit", 0.0)
HARD = Method("FedRot λ=1, A aligned", "fedrot", 1.0)
SOFT = Method("FedRot λ=0.4, A aligned", "fedrot", 0.4)
HARD_B = Method("FedRot λ=1, B aligned", "fedrot", 1.0, "B")
SOFT_B = Method("FedRot λ=0.4, B aligned", "fedrot", 0.4, "B")
METHODS = (FEDIT, HARD, SOFT, HARD_B, SOFT_B)
"""FedRot with either schedule: round 1 aligns A (the default, ``align_first = A``) or B (the
spec's opposite parity). Round 1's uploads are the same for all five, so both are measured."""


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: ``changes`` to the base :class:`SimulationConfig` fields (and
    ``clients`` / ``alpha`` for the data split); ``item``: the issue's list item it covers."""

    name: str
    item: str
    label: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    methods: tuple[Method, ...] = METHODS


BASE = {"num_clients": 3, "alpha": 0.5, "rank": 4, "optimizer": "sgd", "lr": 0.4,
        "local_steps": 10, "rounds": 2, "client_fraction": 1.0}  # fmt: skip
BUDGET = {"batch_size": 8, "max_length": 32, "per_client": 300, "eval_size": 200}
INSTRUCTION_TUNING = {
    "model": "smollm2", "task": "causal-lm", "wordnet_task": "reverse-dictionary", "rank": 8,
    "target_modules": ("all-linear",), "lora_dropout": 0.0, "optimizer": "adamw", "lr": 2e-3,
    "batch_size": 4, "max_length": 64, "per_client": 400, "eval_size": 32, "max_new_tokens": 5,
}  # fmt: skip
"""``make demo-llm``'s task in the simulator: SmolLM2-135M-Instruct on WordNet reverse-dictionary
chats (definition -> word), all-linear LoRA r = 8, AdamW lr 2e-3, batch 4, 10 local steps a
round (demo-llm trains 4 with a cosine schedule and clipping), 32 held-out chats scored by exact
match of at most 5 greedy tokens."""

# Two rounds each: round 0 (never aligned) and round 1 (A aligned, or B under the opposite
# parity), the only round the ratio counts; that is what a shared 2-core machine affords
# (docs/results.md). Cheap settings first, so an interrupted sweep still covers the most items.
SETTINGS = (
    Setting("base", "base", "base (N=3, α=0.5, r=4, SGD lr 0.4, 10 steps)"),
    Setting("stale", "stale updates", "1 of 3 updates one round stale (weight 0.5)",
            {"stale_fraction": 1 / 3, "staleness_weight": 0.5}),
    Setting("independent", "independent init", "own LoRA init in round 0",
            {"client_init": "independent"}),
    Setting("adamw", "optimizer", "AdamW lr 1e-3", {"optimizer": "adamw", "lr": 1e-3}),
    Setting("lr0.1", "learning rate", "SGD lr 0.1", {"lr": 0.1}),
    Setting("rank16", "rank", "r = 16", {"rank": 16}),
    Setting("alpha0.1", "Dirichlet alpha", "α = 0.1", {"alpha": 0.1}),
    Setting("partial", "partial participation", "N = 10, 3 sampled per round",
            {"num_clients": 10, "client_fraction": 0.3}),
    Setting("steps50", "local steps", "50 local steps", {"local_steps": 50}),
    Setting("haar", "control", "own reporting basis (haar; control)", {"client_basis": "haar"}),
    Setting("N10", "clients", "N = 10, all", {"num_clients": 10}),
    Setting("lr1.0", "learning rate", "SGD lr 1.0", {"lr": 1.0}),
    Setting("steps200", "local steps", "200 local steps", {"local_steps": 200}),
    Setting("instruction", "instruction tuning",
            "instruction tuning (SmolLM2, reverse dictionary, AdamW)", INSTRUCTION_TUNING),
)
# Longer runs (6 rounds, the default schedule: A aligned in rounds 1, 3, 5, B in 2, 4) where
# round 1 showed FedRot far from FedIT, to see whether held-out accuracy follows the error.
FOLLOW_UPS = (
    Setting("haar-6rounds", "follow-up", "own reporting basis, 6 rounds",
            {"client_basis": "haar", "rounds": 6}, methods=(FEDIT, HARD)),
    Setting("lr0.1-6rounds", "follow-up", "SGD lr 0.1, 6 rounds", {"lr": 0.1, "rounds": 6},
            methods=(FEDIT, HARD)),
)
SEED = 0
ROUND0_STEPS = 10
"""Round 0 always trains 10 local steps; the steps settings change round 1's (the measured
round), so 200 local steps cost one long round, not two."""


def setting_values(setting: Setting) -> dict[str, Any]:
    return {**BASE, **BUDGET, **setting.changes}


def build_config(setting: Setting, method: Method, model: str, seed: int = SEED):
    """The run's :class:`SimulationConfig` (evaluation after every second round: in a
    two-round run after the last only)."""
    from fedrot_client.lora import LoraSpec
    from fedrot_client.models import ModelSpec
    from fedrot_client.simulation.config import SimulationConfig

    values = setting_values(setting)
    default_lora = LoraSpec()
    return SimulationConfig(
        model=ModelSpec(values.get("model", model), task=values.get("task", "classification"),
                        num_labels=45, seed=seed),
        lora=LoraSpec(r=values["rank"], alpha=2.0 * values["rank"],
                      dropout=values.get("lora_dropout", default_lora.dropout),
                      target_modules=values.get("target_modules", default_lora.target_modules)),
        strategy=method.strategy, lam=method.lam, align_first=method.align_first,
        num_clients=values["num_clients"],
        client_fraction=values["client_fraction"], rounds=values["rounds"],
        local_steps=values["local_steps"], batch_size=values["batch_size"], lr=values["lr"],
        optimizer=values["optimizer"], max_length=values["max_length"],
        max_new_tokens=values.get("max_new_tokens", SimulationConfig.max_new_tokens),
        eval_every=2, seed=seed, num_threads=1,
        client_basis=values.get("client_basis", "shared"),
        client_init=values.get("client_init", "shared"),
        stale_fraction=values.get("stale_fraction", 0.0),
        staleness_weight=values.get("staleness_weight", 0.5),
        extra={"alpha": values["alpha"], "per_client": values["per_client"],
               "eval_size": values["eval_size"], "setting": setting.name, "label": method.slug,
               "round0_steps": ROUND0_STEPS,
               **({"wordnet_task": values["wordnet_task"]} if "wordnet_task" in values else {})},
    )  # fmt: skip


def run_sweep(out: Path, settings: Sequence[Setting], model: str, seed: int = SEED) -> None:
    """Every setting with a method not yet finished, in order: its unfinished methods in one
    two-round run that trains once and aggregates round 1 with each strategy
    (``regime_rounds``: the same records as separate runs); one process, one torch thread."""
    import torch

    from fedrot_client.simulation.command import simulate_to
    from fedrot_client.simulation.federated_data import wordnet_federation
    from regime_rounds import run_two_rounds, shared_keys

    torch.set_num_threads(1)
    for setting in settings:
        configs = {m.slug: build_config(setting, m, model, seed) for m in setting.methods}
        folders = {slug: out / setting.name / slug for slug in configs}
        todo = {slug: c for slug, c in configs.items()
                if not finished(folders[slug], c.to_dict())}  # fmt: skip
        if not todo:
            continue
        values = setting_values(setting)
        data = wordnet_federation(values["num_clients"], alpha=values["alpha"], seed=seed,
                                  eval_size=values["eval_size"], per_client=values["per_client"],
                                  task=values.get("wordnet_task", "categories"))  # fmt: skip
        started = time.perf_counter()
        if values["rounds"] == 2:
            assert shared_keys(list(todo.values())), setting.name
            run_two_rounds(todo, data, {slug: folders[slug] for slug in todo},
                           round0_steps=ROUND0_STEPS)  # fmt: skip
        else:  # separate runs: after round 1 the strategies' uploads differ
            for slug, config in todo.items():
                simulate_to(folders[slug], config, data, plot=False)
        logger.info("%s: %s (%.0f s)", setting.name, ", ".join(todo),
                    time.perf_counter() - started)  # fmt: skip


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(kept) if kept else None


def run_summary(path: Path) -> dict[str, Any] | None:
    """One finished run's numbers: means over rounds >= 1 of the relative aggregation error,
    ``||R - I||_F`` and (when the records hold them) the drift share and FedIT's error for the
    same uploads; final accuracy; run seconds (sum of its rounds)."""
    if not path.is_file():
        return None
    content = json.loads(path.read_text())
    if content.get("summary") is None:
        return None
    later = [r for r in content["rounds"] if r["round_index"] >= 1]
    return {
        "rel_error": _mean([r["relative_aggregation_error"] for r in later]),
        "rel_error_round0": content["rounds"][0]["relative_aggregation_error"],
        "rel_error_round1": later[0]["relative_aggregation_error"] if later else None,
        "rotation_distance": _mean([r.get("rotation_distance") for r in later]),
        "drift_share": _mean([r.get("rotation_drift_share") for r in later]),
        "fedit_rel_error_same_uploads": _mean(
            [r.get("fedit_relative_aggregation_error") for r in later]),
        "final_accuracy": content["summary"]["final_accuracy"],
        "final_exact_match": content["summary"].get("final_exact_match"),
        "final_eval_loss": content["summary"]["final_eval_loss"],
        "seconds": math.fsum(r["seconds"] for r in content["rounds"]),
    }


FEDROT_METHODS = (HARD, SOFT, HARD_B, SOFT_B)


def summarise(out: Path, settings: Sequence[Setting]) -> list[dict[str, Any]]:
    """Per setting: every method's run numbers and ``ratio[slug]``, FedIT's relative error over
    that FedRot method's (means over rounds >= 1; the same uploads in a two-round run)."""
    rows = []
    for setting in settings:
        runs = {m.slug: run_summary(out / setting.name / m.slug / "metrics.json")
                for m in setting.methods}  # fmt: skip
        fedit = runs.get("fedit")
        ratios = {}
        for method in FEDROT_METHODS:
            run = runs.get(method.slug)
            ok = fedit is not None and run is not None and run["rel_error"]
            ratios[method.slug] = fedit["rel_error"] / run["rel_error"] if ok else None
        rows.append({"setting": setting.name, "item": setting.item, "label": setting.label,
                     "runs": runs, "ratio": ratios})  # fmt: skip
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _value(run: Mapping[str, Any] | None, key: str) -> float | None:
    return None if run is None else run[key]


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _held_out(run: Mapping[str, Any] | None) -> str:
    """The final held-out accuracy (%), or the exact match (%, marked EM) of instruction data."""
    if run is not None and run["final_accuracy"] is None and run.get("final_exact_match") is not None:
        return f"{100.0 * run['final_exact_match']:.1f} EM"
    return _fmt(_percent(_value(run, "final_accuracy")), ".1f")


ERROR_HEADER = (
    "setting", "item", "FedIT rel. error", "ratio λ=1 (A)", "ratio λ=0.4 (A)", "ratio λ=1 (B)",
    "ratio λ=0.4 (B)", "‖R − I‖_F λ=1 (A / B)", "drift share λ=1 (A / B)",
)
ACCURACY_HEADER = (
    "setting", "FedIT", "λ=1 (A)", "λ=0.4 (A)", "λ=1 (B)", "λ=0.4 (B)", "FedIT loss",
    "λ=1 (B) loss",
)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in rows)]  # fmt: skip


def write_table(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Two Markdown tables: errors (means over rounds >= 1, i.e. round 1) with the ratios
    FedIT / FedRot per schedule (A or B aligned in round 1) and lambda, and the final held-out
    accuracy (%) and loss."""
    errors, accuracies = [], []
    for row in rows:
        runs, ratio = row["runs"], row["ratio"]
        fedit, hard, hard_b = runs.get("fedit"), runs.get(HARD.slug), runs.get(HARD_B.slug)
        pair = lambda key, spec: f"{_fmt(_value(hard, key), spec)} / {_fmt(_value(hard_b, key), spec)}"  # noqa: E501,E731
        errors.append([
            row["label"], row["item"], _fmt(_value(fedit, "rel_error"), ".4f"),
            *(_fmt(ratio[m.slug], ".3f") for m in FEDROT_METHODS),
            pair("rotation_distance", ".2g"), pair("drift_share", ".2g"),
        ])  # fmt: skip
        accuracies.append([
            row["label"], _held_out(fedit),
            *(_held_out(runs.get(m.slug)) for m in FEDROT_METHODS),
            _fmt(_value(fedit, "final_eval_loss"), ".3f"),
            _fmt(_value(hard_b, "final_eval_loss"), ".3f"),
        ])  # fmt: skip
    lines = _markdown(ERROR_HEADER, errors) + [""] + _markdown(ACCURACY_HEADER, accuracies)
    path.write_text("\n".join(lines) + "\n")


def plot(rows: Sequence[Mapping[str, Any]], img: Path) -> list[Path]:
    """``regime_ratio.png`` (error ratio per setting and FedRot method) and
    ``regime_ratio_vs_drift.png`` (ratio against the drift share of the lambda = 1 runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    done = [r for r in rows if any(v is not None for v in r["ratio"].values())]
    labels = {m.slug: m.label.removeprefix("FedRot ") for m in FEDROT_METHODS}
    fig, ax = plt.subplots(figsize=(8.5, 0.55 * len(done) + 1.5))
    height = 0.2
    for k, method in enumerate(FEDROT_METHODS):
        ax.barh([i + (k - 1.5) * height for i in range(len(done))],
                [r["ratio"][method.slug] or float("nan") for r in done], height=height,
                label=labels[method.slug])  # fmt: skip
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.axvline(2.0, color="red", lw=0.8, ls="--", label="2x")
    ax.set_yticks(range(len(done)), [r["label"] for r in done], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("FedIT / FedRot relative aggregation error, round 1 (same uploads)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    written = [img / "regime_ratio.png"]
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for method, marker in ((HARD, "o"), (HARD_B, "s")):
        points = [(r["runs"][method.slug]["drift_share"], r["ratio"][method.slug], r["setting"])
                  for r in done if r["runs"].get(method.slug) is not None
                  and r["runs"][method.slug]["drift_share"] is not None]  # fmt: skip
        if not points:
            continue
        shares = [max(p[0], 1e-6) for p in points]  # log axis: a share below 1e-6 at 1e-6
        ax.scatter(shares, [p[1] for p in points], marker=marker, label=labels[method.slug])
        for share, (_, ratio, name) in zip(shares, points, strict=True):
            if not 0.95 < ratio < 1.05:  # label the settings where alignment changed something
                ax.annotate(name, (share, ratio), fontsize=7)
    ax.axhline(2.0, color="red", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rotation drift share (optimal rotation), round 1")
    ax.set_ylabel("FedIT / FedRot λ=1 relative aggregation error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(img / "regime_ratio_vs_drift.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def follow_up_lines(out: Path, follow_ups: Sequence[Setting]) -> list[str]:
    """Per follow-up and method: the relative error and held-out accuracy by round."""
    lines = ["| setting | method | rel. error by round | mean rel. error, rounds >= 1 | "
             "held-out acc. (%) after 2, 4, 6 rounds | ‖R − I‖_F by round |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for setting in follow_ups:
        for method in setting.methods:
            path = out / setting.name / method.slug / "metrics.json"
            if run_summary(path) is None:
                continue
            rounds = json.loads(path.read_text())["rounds"]
            errors = ", ".join(f"{r['relative_aggregation_error']:.3g}" for r in rounds)
            accuracy = ", ".join(f"{100 * r['eval_accuracy']:.1f}" for r in rounds
                                 if r["eval_accuracy"] is not None)  # fmt: skip
            rotations = ", ".join("-" if r["rotation_distance"] is None
                                  else f"{r['rotation_distance']:.2g}" for r in rounds)  # fmt: skip
            lines.append(f"| {setting.label} | {method.slug} | {errors} | "
                         f"{run_summary(path)['rel_error']:.4f} | {accuracy} | {rotations} |")
    return lines


def write_report(out: Path, img: Path | None, settings: Sequence[Setting],
                 follow_ups: Sequence[Setting] = ()) -> None:  # fmt: skip
    rows = summarise(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_table(rows, out / "table.md")
    if follow_ups:
        with (out / "table.md").open("a") as handle:
            handle.write("\n" + "\n".join(follow_up_lines(out, follow_ups)) + "\n")
    for path in plot(rows, img) if img is not None else ():
        logger.info("wrote %s", path)
    logger.info("wrote %s and %s", out / "summary.json", out / "table.md")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["run", "report", "all"])
    parser.add_argument("--out", type=Path, default=Path("experiments/regime"))
    parser.add_argument("--img", type=Path, default=Path("docs/img"))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--only", nargs="+", default=None, help="setting names to run")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="run seed (split, init, batches); use another --out per seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    logging.getLogger("fedrot_client").setLevel(logging.WARNING)
    # another seed repeats the two-round sweep (tables only); the follow-ups and plots are seed 0's
    everything = SETTINGS + (FOLLOW_UPS if args.seed == SEED else ())
    settings = everything if args.only is None else tuple(
        s for s in everything if s.name in set(args.only))
    if args.action in ("run", "all"):
        run_sweep(args.out, settings, args.model, args.seed)
    if args.action in ("report", "all"):
        if args.seed == SEED:
            write_report(args.out, args.img, SETTINGS, FOLLOW_UPS)
        else:
            write_report(args.out, None, SETTINGS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
