"""PNG plots of simulated runs (matplotlib, Agg backend; the ``experiments`` extra).

A curve set is ``{label: [(round, value), ...]}``; :func:`plot_panels` draws one panel per
metric with one line per label, and optional shaded bands (mean +- std over seeds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

Series = Sequence[tuple[int, float]]


@dataclass(frozen=True)
class Panel:
    """One axis: ``lines[label]`` are (round, mean) points, ``bands[label]`` the matching std."""

    title: str
    ylabel: str
    lines: Mapping[str, Series]
    bands: Mapping[str, Sequence[float]] | None = None
    log_y: bool = False


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("plots need matplotlib: pip install -e '.[experiments]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_panels(panels: Sequence[Panel], path: Path, *, title: str | None = None) -> Path:
    """Draw ``panels`` side by side into ``path`` (PNG, 110 dpi)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        for label, points in panel.lines.items():
            finite = [(x, y) for x, y in points if y is not None and y == y]
            if not finite:
                continue
            xs, ys = zip(*finite, strict=True)
            (line,) = axis.plot(xs, ys, label=label, linewidth=1.4)
            spread = (panel.bands or {}).get(label)
            if spread is not None and len(spread) == len(points):
                lows = [y - s for (_, y), s in zip(points, spread, strict=True)]
                highs = [y + s for (_, y), s in zip(points, spread, strict=True)]
                axis.fill_between([x for x, _ in points], lows, highs,
                                  color=line.get_color(), alpha=0.15, linewidth=0)  # fmt: skip
        if panel.log_y:
            axis.set_yscale("log")
        axis.set_title(panel.title, fontsize=10)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(panel.ylabel)
        axis.grid(alpha=0.3)
    for axis in axes[0][:-1]:  # a panel with labels of its own gets its own legend
        labels = axis.get_legend_handles_labels()[1]
        if len(labels) > 1 and set(labels) != set(panels[-1].lines):
            axis.legend(fontsize=7, loc="best")
    axes[0][-1].legend(fontsize=7, loc="best")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_run(rounds: Sequence[Mapping[str, object]], path: Path, *, title: str) -> Path:
    """One run's curves: train / held-out loss, held-out metric, relative aggregation error
    (with FedIT's for the same uploads when it differs) and, when the run aligns, the rotation
    drift share (optimal and applied rotations)."""
    def series(key: str) -> list[tuple[int, float]]:
        return [(int(r["round_index"]), r[key]) for r in rounds if r.get(key) is not None]

    errors = {"global": series("relative_aggregation_error")}
    if any(r.get("error_removed_share") not in (None, 0.0) for r in rounds):
        errors["FedIT, same uploads"] = series("fedit_relative_aggregation_error")
    metrics = [m for m in ("eval_accuracy", "eval_exact_match")
               if any(r.get(m) is not None for r in rounds)] or ["eval_perplexity"]  # fmt: skip
    panels = [
        Panel("loss", "cross-entropy", {"train": series("train_loss"),
                                         "held-out": series("eval_loss")}),  # fmt: skip
        *(Panel(m.replace("eval_", "held-out ").replace("_", " "), m, {"global": series(m)})
          for m in metrics),
        Panel("relative aggregation error", "||E|| / ||update||", errors, log_y=True),
    ]
    if any(r.get("rotation_drift_share") is not None for r in rounds):
        panels.append(Panel("drift share a rotation removes", "share of drift",
                            {"optimal": series("rotation_drift_share"),
                             "applied": series("applied_rotation_drift_share")}))  # fmt: skip
    return plot_panels(panels, path, title=title)
