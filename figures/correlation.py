"""Does sharpness predict generalisation here? Each sharpness measure of a set of runs against their dev metric,
with Kendall's τ and a bootstrap interval — the question Andriushchenko et al. (2023, "A modern look at the
relationship between sharpness and generalization") answer "often not" for transformers, asked of the user's runs.

A run's measures come from the results in its ``analyses/`` folder (or given beside it) whose ``meta.run.path`` is
the run: the top Hessian eigenvalue and the Hutchinson trace (``hessian``, else ``sharpness`` with ``--top-k`` /
``--trace-samples``), ε-sharpness (projected ascent), adaptive and average sharpness at the first ρ / σ
(``sharpness``), and the surface rise, the mean loss over the finite cells of a 2-D surface minus the loss at its
origin. The dev metric is the run's final one (``run.json``). τ is Kendall's τ-b (ties counted as neither
concordant nor discordant); its interval is the 2.5 and 97.5 percentiles of τ over ``resamples`` bootstrap
resamples of the runs (pairs kept together; resamples where one variable is constant are skipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from figures.sources import Collection, ResultRecord, RunRecord
from figures.style import finite, new_figure, optimizer_style, styled
from landscape.core.errors import ConfigError

MIN_RUNS = 3  # fewer points give τ ∈ {−1, 0, 1} and no interval worth drawing


def _first(record: ResultRecord, name: str) -> float | None:
    value = record.arrays.get(name)
    if value is None:
        return None
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    return float(flat[0]) if flat.size and math.isfinite(flat[0]) else None


def _surface_rise(record: ResultRecord) -> float | None:
    if "b" not in record.arrays:
        return None
    loss, a, b = (np.asarray(record.arrays[k], dtype=np.float64) for k in ("loss", "a", "b"))
    at_origin = loss[int(np.argmin(np.abs(b))), int(np.argmin(np.abs(a)))]
    cells = loss[np.isfinite(loss)]
    return float(cells.mean() - at_origin) if cells.size and math.isfinite(at_origin) else None


#: measure name -> (result kinds it is read from, in order of preference; how)
MEASURES: dict[str, tuple[tuple[str, ...], Callable[[ResultRecord], float | None]]] = {
    "top Hessian eigenvalue": (("hessian", "sharpness"), lambda r: _first(r, "eigenvalues")),
    "Hessian trace": (("hessian", "sharpness"), lambda r: _first(r, "trace")),
    "ε-sharpness (PGD)": (("sharpness",), lambda r: _first(r, "eps_sharpness_pgd")),
    "adaptive sharpness": (("sharpness",), lambda r: _first(r, "adaptive_sharpness")),
    "average sharpness": (("sharpness",), lambda r: _first(r, "average_sharpness")),
    "surface rise": (("surface",), _surface_rise),
}


@dataclass(frozen=True)
class RunPoint:
    """One run: its label (optimizer), final dev metric, and every measure found for it."""

    path: Path
    label: str
    metric: float
    measures: Mapping[str, float]


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b of the pairs (x_i, y_i); NaN when either variable is constant or there are < 2 pairs."""
    if len(x) < 2:
        return math.nan
    return float(stats.kendalltau(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)).statistic)


def tau_interval(
    x: Sequence[float], y: Sequence[float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`kendall_tau` over resamples of the pairs; (NaN, NaN) when none is
    defined (fewer than :data:`MIN_RUNS` pairs, or every resample degenerate)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < MIN_RUNS:
        return math.nan, math.nan
    generator = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        rows = generator.integers(0, len(x), len(x))
        tau = kendall_tau(x[rows], y[rows])
        if math.isfinite(tau):
            values.append(tau)
    if not values:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def run_points(collection: Collection, metric: str | None = None) -> list[RunPoint]:
    """Every run of ``collection`` with a final dev metric, with the measures of its results."""
    by_run: dict[Path, list[ResultRecord]] = {}
    for record in collection.results:
        path = record.run.get("path")
        if path:
            by_run.setdefault(Path(str(path)).resolve(), []).append(record)
    points = []
    for run in collection.runs:
        name = metric or run.metric_name
        value = run.dev_metrics.get(name) if name else None
        if value is None or not math.isfinite(float(value)):
            continue
        results = by_run.get(run.path.resolve(), [])
        measures = {}
        for measure, (kinds, read) in MEASURES.items():
            for kind in kinds:
                found = [read(r) for r in results if r.kind == kind]
                found = [v for v in found if v is not None]
                if found:
                    measures[measure] = found[0]
                    break
        points.append(RunPoint(run.path, run.label, float(value), measures))
    return points


def measured(points: Sequence[RunPoint]) -> list[str]:
    """The measures that at least :data:`MIN_RUNS` runs have."""
    return [m for m in MEASURES if sum(m in p.measures for p in points) >= MIN_RUNS]


def _metric_name(runs: Sequence[RunRecord], metric: str | None) -> str:
    return metric or " / ".join(sorted({run.metric_name for run in runs if run.metric_name})) or "metric"


@styled
def sharpness_vs_metric(collection: Collection, *, metric: str | None = None, seed: int = 0) -> Figure:
    """One panel per measure: the dev metric (y) of each run against the measure (x), one colour per optimizer,
    with τ, its 95 % bootstrap interval and n in the panel's title."""
    points = run_points(collection, metric)
    names = measured(points)
    if not names:
        raise ConfigError(
            f"no sharpness measure is available for {MIN_RUNS} or more runs with a final dev metric; run hessian, "
            "sharpness or a 2-D surface on each run (into RUN/analyses/<kind>) first"
        )
    columns = 2 if len(names) > 1 else 1
    rows = math.ceil(len(names) / columns)
    fig, axes = new_figure(rows, columns, height=2.0 * rows)
    for ax, name in zip(axes, names, strict=False):
        chosen = [p for p in points if name in p.measures]
        x = [p.measures[name] for p in chosen]
        y = [p.metric for p in chosen]
        tau = kendall_tau(x, y)
        low, high = tau_interval(x, y, seed=seed)
        for label in dict.fromkeys(p.label for p in chosen):
            mine = [p for p in chosen if p.label == label]
            style = optimizer_style(label)
            ax.scatter(finite([p.measures[name] for p in mine]), finite([p.metric for p in mine]), s=14,
                       color=style["color"], marker=style.get("marker", "o"), label=label)  # fmt: skip
        interval = "" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]"
        ax.set_title(f"τ = {tau:.2f}{interval}\nn = {len(chosen)}", fontsize="small")  # two lines: narrow panels
        ax.set_xlabel(name)
        ax.set_ylabel("dev " + _metric_name(collection.runs, metric))
    spare = axes[len(names) :]
    for ax in spare:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(spare):  # the legend in the empty panel, clear of the points
        spare[0].set_visible(True)
        spare[0].axis("off")
        spare[0].legend(handles, labels, loc="center", fontsize="x-small")
    else:
        axes[0].legend(handles, labels, loc="best", fontsize="x-small")
    return fig
