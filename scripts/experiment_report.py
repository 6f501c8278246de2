"""Tables and plots of the experiment grid (``scripts/experiments.py report``).

Reads every ``<out>/<setting>/<method>/seed<k>/metrics.json`` that holds a summary, groups the
runs by setting and method, and writes ``<out>/tables.md`` (best, final and last-quarter
held-out accuracy, mean +- std over seeds, the mean relative aggregation error and rotation
size) plus, per setting, a PNG of the
accuracy curves and of the per-round relative aggregation error under ``img``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedrot_client.simulation.plots import Panel, plot_panels

METHOD_ORDER = ("fedit", "fedrot-lam0.2", "fedrot-lam0.4", "fedrot-lam0.6", "fedrot-lam1",
                "ffa", "rolora", "flexlora")  # fmt: skip


def load_runs(out: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{setting: {method slug: [metrics.json content per finished seed]}}``."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(out.glob("*/*/seed*/metrics.json")):
        content = json.loads(path.read_text())
        if content.get("summary") is None:
            continue
        setting, method = path.parts[-4], path.parts[-3]
        runs[setting][method].append(content)
    return runs


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread


def _cell(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, spread = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def _label(runs: list[dict[str, Any]]) -> str:
    return str(runs[0]["config"]["extra"].get("label", runs[0]["config"]["strategy"]))


def _ordered(methods: dict[str, list]) -> list[str]:
    return sorted(methods, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)


def per_round(runs: list[dict[str, Any]], key: str) -> tuple[list[tuple[int, float]], list[float]]:
    """Mean and std over seeds of ``key`` per round (rounds every seed has)."""
    count = min(len(r["rounds"]) for r in runs)
    points, spreads = [], []
    for t in range(count):
        values = [r["rounds"][t][key] for r in runs if r["rounds"][t][key] is not None]
        if not values:
            continue
        mean, spread = mean_std(values)
        points.append((t, mean))
        spreads.append(spread)
    return points, spreads


def table(setting: str, methods: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown rows for one setting."""
    lines = [f"### {setting}", "",
             "| method | seeds | best acc. (%) | final acc. (%) | last-quarter acc. (%) | "
             "final held-out loss | mean rel. aggregation error | mean rel. error, rounds >= 1 | "
             "mean ‖R − I‖_F |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for slug in _ordered(methods):
        runs = methods[slug]
        best = [r["summary"]["best_accuracy"] for r in runs]
        final = [r["summary"]["final_accuracy"] for r in runs]
        loss = [r["summary"]["final_eval_loss"] for r in runs]
        errors = [r["summary"]["mean_relative_aggregation_error"] or 0.0 for r in runs]
        later = [statistics.fmean(x["relative_aggregation_error"] or 0.0 for x in r["rounds"][1:])
                 for r in runs]  # fmt: skip
        lines.append(f"| {_label(runs)} | {len(runs)} | {_cell(best)} | {_cell(final)} | "
                     f"{_cell([_last_quarter(r) for r in runs])} | {_cell(loss, 1.0, 3)} | {_cell(errors, 1.0, 4)} | "
                     f"{_cell(later, 1.0, 4)} | {_rotation_cell(runs)} |")  # fmt: skip
    return lines + [""]


def _last_quarter(run: dict[str, Any]) -> float:
    """Mean held-out accuracy over the evaluations of the last quarter of the rounds: steadier
    than the final value when the accuracy swings from one evaluation to the next."""
    rounds = run["rounds"]
    start = len(rounds) - max(1, len(rounds) // 4)
    return statistics.fmean(r["eval_accuracy"] for r in rounds[start:]
                            if r["eval_accuracy"] is not None)  # fmt: skip


def _rotation_cell(runs: list[dict[str, Any]]) -> str:
    """Mean over seeds of each run's mean ``||R - I||_F`` over its aligned rounds ("-" for a
    method that never rotates)."""
    per_run = []
    for run in runs:
        values = [r["rotation_distance"] for r in run["rounds"]
                  if r["rotation_distance"] is not None]  # fmt: skip
        if values:
            per_run.append(statistics.fmean(values))
    return _cell(per_run, 1.0, 4) if per_run else "-"


def error_table(setting: str, methods: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Per-round relative aggregation error (mean over seeds) for one setting."""
    slugs = _ordered(methods)
    count = min(len(r["rounds"]) for s in slugs for r in methods[s])
    lines = [f"#### {setting}: relative aggregation error per round (mean over seeds)", "",
             "| round | " + " | ".join(_label(methods[s]) for s in slugs) + " |",
             "| --- |" + " --- |" * len(slugs)]  # fmt: skip
    for t in range(count):
        cells = []
        for s in slugs:
            values = [r["rounds"][t]["relative_aggregation_error"] for r in methods[s]]
            values = [v for v in values if v is not None]
            cells.append(f"{statistics.fmean(values):.2e}" if values else "-")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_setting(setting: str, methods: dict[str, list[dict[str, Any]]], img: Path) -> Path:
    lines, bands, errors, losses = {}, {}, {}, {}
    for slug in _ordered(methods):
        label = _label(methods[slug])
        lines[label], bands[label] = per_round(methods[slug], "eval_accuracy")
        errors[label], _ = per_round(methods[slug], "relative_aggregation_error")
        losses[label], _ = per_round(methods[slug], "train_loss")
    panels = [
        Panel("held-out accuracy (mean ± std over seeds)", "accuracy", lines, bands),
        Panel("train loss (mean over seeds)", "cross-entropy", losses),
        Panel("relative aggregation error", "||E||_F / ||update||_F", errors, log_y=True),
    ]
    return plot_panels(panels, img / f"sim-{setting}.png", title=f"MiniLM, WordNet, {setting}")


GENERATIVE_FOLDERS = ("generative", "generative-15rounds")


def generative_table(out: Path, folder: str) -> list[str]:
    """The SmolLM2 check in ``out/folder``: held-out perplexity per round, per method and seed."""
    runs = load_runs(out / folder)
    lines: list[str] = []
    for setting, methods in runs.items():
        lines += [f"### Generative check (SmolLM2-135M, {setting}, {folder})", "",
                  "| method | seed | best ppl | final ppl | perplexity by round | mean rel. error |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for slug in _ordered(methods):
            for run in methods[slug]:
                curve = ", ".join(f"{r['eval_perplexity']:.1f}" for r in run["rounds"]
                                  if r["eval_perplexity"] is not None)  # fmt: skip
                summary = run["summary"]
                error = summary["mean_relative_aggregation_error"]
                lines.append(f"| {_label([run])} | {run['config']['seed']} | "
                             f"{summary['best_perplexity']:.2f} | "
                             f"{summary['final_perplexity']:.2f} | {curve} | "
                             f"{error:.4f} |")  # fmt: skip
        lines.append("")
    return lines


def write_report(out: Path, img: Path, budget: object | None = None) -> Path:
    """``<out>/tables.md`` and ``<img>/sim-<setting>.png``; returns the tables' path."""
    runs = load_runs(out)
    lines = ["# Simulated comparison: tables (generated by scripts/experiments.py report)", ""]
    if budget is not None:
        lines += [f"Budget: `{budget}`", ""]
    for setting in sorted(runs, key=lambda s: (-int(s.split("-")[0][1:]), s)):
        lines += table(setting, runs[setting])
        lines += error_table(setting, runs[setting])
        plot_setting(setting, runs[setting], img)
    for folder in GENERATIVE_FOLDERS:
        lines += generative_table(out, folder)
    path = out / "tables.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path
