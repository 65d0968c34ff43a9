"""Figures of the report (PNG): differences to a baseline, few-shot curves, model comparisons, prompt spread.

Functions take plain pandas data (fractions, as in records) and return a `Plot` with the written
path and the data as drawn (percent, in drawing order), read back from the figure's artists.
Figures are built with `matplotlib.figure.Figure` and the Agg canvas, never through pyplot, so no
global backend or figure state is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clipbench.errors import ClipbenchError

POSITIVE_COLOR = "#2ca02c"  # green: the model beats the baseline (as in the paper's Figure 5)
NEGATIVE_COLOR = "#1f77b4"  # blue: the baseline wins


@dataclass(frozen=True)
class Plot:
    """A written figure and the values it shows, as drawn (percent or percentage points, drawing order)."""

    path: Path
    data: pd.Series | pd.DataFrame


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_baseline_differences(differences: pd.Series, path: Path, title: str = "",
                              xlabel: str = "score - baseline (percentage points)") -> Plot:
    """Horizontal bars of per-dataset differences to a baseline, largest on top (the paper's Figure 5).

    `differences`: index = dataset names, values = fractions (ours - baseline). Bars are drawn in
    percentage points, green where positive, blue where negative. `Plot.data` holds the bar widths
    top to bottom, indexed by the bar labels.
    """
    values = differences.dropna().astype(float)
    if values.empty:
        raise ClipbenchError(f"Nothing to plot for {path}: no dataset has both a score and a baseline value.")
    ordered = (100.0 * values).sort_values(ascending=True)  # barh draws bottom-up: largest ends on top
    fig = Figure(figsize=(7.0, 1.0 + 0.3 * len(ordered)))
    ax = fig.add_subplot()
    colors = [POSITIVE_COLOR if v > 0 else NEGATIVE_COLOR for v in ordered]
    bars = ax.barh(np.arange(len(ordered)), ordered.to_numpy(), color=colors)
    ax.set_yticks(np.arange(len(ordered)), labels=list(ordered.index))
    for bar, value in zip(bars, ordered):
        ax.annotate(f"{value:+.1f}", (value, bar.get_y() + bar.get_height() / 2), xytext=(3 if value > 0 else -3, 0),
                    textcoords="offset points", ha="left" if value > 0 else "right", va="center", fontsize=8)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.margins(x=0.15)
    drawn = pd.Series([bar.get_width() for bar in bars], index=[t.get_text() for t in ax.get_yticklabels()])
    return Plot(_save(fig, path), drawn.iloc[::-1])


def plot_few_shot(curves: pd.DataFrame, path: Path, zero_shot: pd.Series | None = None,
                  std: pd.DataFrame | None = None, title: str = "") -> Plot:
    """Few-shot score against labelled examples per class (log x), one line per dataset.

    `curves`: index = k (shots per class), columns = datasets, values = fractions; `std` the same
    shape (shaded ±1 std); `zero_shot`: per dataset, drawn as a dashed line in the dataset's color.
    `Plot.data` holds the plotted line values in percent (index k, columns datasets).
    """
    if curves.empty:
        raise ClipbenchError(f"Nothing to plot for {path}: no few-shot results.")
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    drawn = {}
    for dataset in curves.columns:
        curve = 100.0 * curves[dataset].dropna().astype(float)
        (line,) = ax.plot(curve.index.astype(float), curve.to_numpy(), marker="o", label=str(dataset))
        drawn[dataset] = pd.Series(line.get_ydata(), index=curve.index)
        if std is not None and dataset in std.columns:
            spread = 100.0 * std[dataset].reindex(curve.index).fillna(0.0).astype(float)
            ax.fill_between(curve.index.astype(float), curve - spread, curve + spread,
                            color=line.get_color(), alpha=0.15)
        if zero_shot is not None and pd.notna(zero_shot.get(dataset)):
            ax.axhline(100.0 * float(zero_shot[dataset]), color=line.get_color(), linestyle="--", linewidth=1.0)
    ax.set_xscale("log", base=2)
    ax.set_xticks([float(k) for k in curves.index], labels=[str(k) for k in curves.index])
    ax.set_xlabel("labelled training examples per class (k)")
    ax.set_ylabel("score (%)  [dashed: zero-shot]")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return Plot(_save(fig, path), pd.DataFrame(drawn))


def plot_model_comparison(values: pd.DataFrame, path: Path, title: str = "", xlabel: str = "score (%)") -> Plot:
    """Grouped horizontal bars: one group per dataset (rows of `values`, first on top), one bar per model.

    `values`: index = datasets, columns = models, values = fractions (NaN: not evaluated, drawn as 0
    width). `Plot.data` holds the bar widths in percent, shaped like `values`.
    """
    if values.empty:
        raise ClipbenchError(f"Nothing to plot for {path}: no results.")
    n_datasets, n_models = values.shape
    fig = Figure(figsize=(7.0, 1.0 + 0.25 * n_datasets * n_models + 0.2 * n_datasets))
    ax = fig.add_subplot()
    height = 0.8 / n_models
    positions = np.arange(n_datasets)[::-1].astype(float)  # first dataset on top
    widths = {}
    for j, model in enumerate(values.columns):
        bars = ax.barh(positions + (n_models - 1 - j) * height - 0.4 + height / 2,
                       (100.0 * values[model].astype(float)).fillna(0.0).to_numpy(), height=height, label=str(model))
        widths[model] = [bar.get_width() for bar in bars]
    ax.set_yticks(positions, labels=[str(d) for d in values.index])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="x", alpha=0.3)
    return Plot(_save(fig, path), pd.DataFrame(widths, index=values.index))


def plot_forest(differences: pd.DataFrame, path: Path, title: str = "",
                xlabel: str = "difference (percentage points)") -> Plot:
    """A forest plot: one row per label (first on top), a point at the difference and a line over
    its interval, and a vertical line at 0.

    `differences`: index = row labels, columns `difference`, `low`, `high` (fractions; NaN bounds:
    a point without interval). `Plot.data` holds the drawn points and bounds in percentage points.
    """
    values = 100.0 * differences[["difference", "low", "high"]].astype(float)
    values = values[values["difference"].notna()]
    if values.empty:
        raise ClipbenchError(f"Nothing to plot for {path}: no difference to show.")
    fig = Figure(figsize=(7.0, 1.0 + 0.35 * len(values)))
    ax = fig.add_subplot()
    positions = np.arange(len(values))[::-1].astype(float)
    errors = np.vstack([values["difference"] - values["low"], values["high"] - values["difference"]])
    ax.errorbar(values["difference"].to_numpy(), positions, xerr=np.nan_to_num(errors), fmt="o", color="black",
                ecolor=NEGATIVE_COLOR, capsize=3)
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yticks(positions, labels=[str(label) for label in values.index])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    (points,) = [line for line in ax.get_lines() if line.get_marker() == "o"]
    drawn = values.assign(difference=points.get_xdata())
    return Plot(_save(fig, path), drawn)


ENSEMBLE_COLOR = "#d62728"  # red: the prompt ensemble among its single templates


def plot_prompt_spread(per_template: Mapping[str, Sequence[float]], ensemble: pd.Series, path: Path,
                       title: str = "", xlabel: str = "score (%)") -> Plot:
    """A strip plot of prompt sensitivity: one row per dataset (first on top), a dot per template
    used alone, and the ensemble marked with a red diamond.

    `per_template`: dataset -> the per-template values (fractions); `ensemble`: per dataset, the
    ensemble's value (fraction). `Plot.data` holds the drawn points in percent, one row each:
    columns `dataset`, `kind` (`template` or `ensemble`), `value`.
    """
    datasets = [d for d, values in per_template.items() if len(values)]
    if not datasets:
        raise ClipbenchError(f"Nothing to plot for {path}: no per-template values.")
    fig = Figure(figsize=(7.0, 1.2 + 0.45 * len(datasets)))
    ax = fig.add_subplot()
    positions = dict(zip(datasets, np.arange(len(datasets))[::-1].astype(float)))
    xs = np.concatenate([100.0 * np.asarray(per_template[d], dtype=float) for d in datasets])
    ys = np.concatenate([np.full(len(per_template[d]), positions[d]) for d in datasets])
    templates = ax.scatter(xs, ys, s=18, color="grey", alpha=0.7, label="single template")
    marked = [d for d in datasets if pd.notna(ensemble.get(d))]
    ensembles = ax.scatter([100.0 * float(ensemble[d]) for d in marked], [positions[d] for d in marked],
                           s=60, marker="D", color=ENSEMBLE_COLOR, label="ensemble", zorder=3)
    ax.set_yticks(list(positions.values()), labels=[str(d) for d in datasets])
    ax.set_ylim(-0.7, len(datasets) - 0.3)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="x", alpha=0.3)
    by_position = {p: d for d, p in positions.items()}
    drawn = [{"dataset": by_position[float(y)], "kind": kind, "value": float(x)}
             for kind, points in (("template", templates), ("ensemble", ensembles))
             for x, y in points.get_offsets()]
    return Plot(_save(fig, path), pd.DataFrame(drawn, columns=["dataset", "kind", "value"]))
