"""Figures from run directories (``run.json``, ``metrics.jsonl``): training curves (FSAM Fig. 6) and the dev metric
against a hyperparameter over several runs: sparsity s and mask interval F_i (FSAM Fig. 1, Table 4) and the
training-data fraction (FSAM Fig. 2; Bahri et al. Fig. 1)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure

from figures.sources import RunRecord, as_run_record, legend_labels
from figures.style import apply_scale, finite, new_figure, optimizer_style, styled
from landscape.core.errors import ConfigError

RunSource = RunRecord | str | os.PathLike[str]
SWEEP_LABELS = {
    "sparsity": "sparsity s (share of coordinates not perturbed)",
    "mask_interval": "mask interval F_i (steps)",
    "train_fraction": "training-data fraction",
    "rho": "neighbourhood radius ρ",
    "ascent_fraction": "ascent micro-batch a / b",
    "m_sharpness": "sharpness m (ascent micro-batches)",
    "delta_beta": "δ-SAM β",
}
#: the SAM hyperparameters a sweep figure is drawn for (Bahri et al. Fig. 2: ρ, a, m; δ-SAM's β), among SAM runs
SAM_SWEEPS = ("rho", "ascent_fraction", "m_sharpness", "delta_beta")
#: above this many runs the curves' legend has one entry per optimizer label (its colour), not one per run: a sweep's
#: dozen run names would not fit beside the axes
MAX_LEGEND_RUNS = 6


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    smoothed = np.convolve(values, kernel, mode="valid")
    return np.concatenate([np.full(window - 1, np.nan), smoothed])


def _curve_labels(runs: Sequence[RunRecord]) -> list[str]:
    """:func:`legend_labels`, or past :data:`MAX_LEGEND_RUNS` runs one "label (n runs)" per optimizer label on its first
    run and matplotlib's hidden label ("_…") on the others."""
    if len(runs) <= MAX_LEGEND_RUNS:
        return legend_labels(runs)
    counts = Counter(run.label for run in runs)
    seen: set[str] = set()
    labels = []
    for run in runs:
        labels.append(f"_{run.label}" if run.label in seen else f"{run.label} ({counts[run.label]} runs)")
        seen.add(run.label)
    return labels


@styled
def training_curves(sources: Sequence[RunSource], *, metric: str | None = None) -> Figure:
    """FSAM Fig. 6: top, training loss against step (thin: per step; thick: moving average; log scale when it spans
    two decades); bottom, the dev metric (the task's primary one unless ``metric``) against step, from each run's
    ``metrics.jsonl`` evaluation records."""
    runs = [as_run_record(source) for source in sources]
    fig, (loss_ax, metric_ax) = new_figure(2, 1, sharex=True)
    labels = _curve_labels(runs)
    metric_names = set()
    losses = []
    for run, label in zip(runs, labels, strict=True):
        style = optimizer_style(run.label)
        style.pop("marker")
        train = run.records_of("train")
        if train:
            steps = np.array([r.get("step", np.nan) for r in train], dtype=np.float64)
            loss = finite([r.get("loss", np.nan) for r in train])
            window = max(1, len(loss) // 40)
            loss_ax.plot(steps, loss, color=style["color"], linewidth=0.4, alpha=0.3)
            loss_ax.plot(steps, _moving_average(loss, window), label=label, **style)
            losses.append(loss)
        name = metric or run.metric_name
        evals = [r for r in run.records_of("eval") if name in r]
        if name and evals:
            metric_names.add(name)
            metric_ax.plot(
                [r["step"] for r in evals],
                finite([r[name] for r in evals]),
                label=label,
                marker=optimizer_style(run.label)["marker"],
                **style,
            )
    if losses:
        apply_scale(loss_ax, "y", np.concatenate(losses))
        loss_ax.legend(loc="best")
    else:
        loss_ax.text(0.5, 0.5, "no training records", ha="center", va="center", transform=loss_ax.transAxes)
    if not metric_names:
        metric_ax.text(0.5, 0.5, "no evaluation records", ha="center", va="center", transform=metric_ax.transAxes)
    loss_ax.set_ylabel("training loss")
    metric_ax.set_ylabel("dev " + " / ".join(sorted(metric_names)) if metric_names else "dev metric")
    metric_ax.set_xlabel("training step")
    loss_ax.set_title(" / ".join(sorted({run.task for run in runs})))
    return fig


def sweep_points(runs: Sequence[RunRecord], parameter: str, metric: str | None = None) -> dict[str, dict]:
    """``{label: {x: [metric of each seed]}}`` for the runs whose config has ``parameter`` and a final dev metric."""
    points: dict[str, dict] = {}
    for run in runs:
        name = metric or run.metric_name
        value = run.dev_metrics.get(name) if name else None
        x = run.config.get(parameter)
        if value is None or x is None:
            continue
        points.setdefault(run.label, {}).setdefault(float(x), []).append(float(value))
    return points


@styled
def metric_vs_hyperparameter(
    sources: Sequence[RunSource],
    parameter: str,
    *,
    metric: str | None = None,
    applies: Callable[[RunRecord], bool] | None = None,
) -> Figure:
    """The final dev metric (y; line: mean over seeds, band: ± standard deviation, dots: every seed) against the
    config value ``parameter`` (x; log scale when it spans a decade), one line per optimizer label. Runs for which
    ``applies`` is False (e.g. runs without a Fisher mask in a sparsity sweep) are horizontal reference lines."""
    runs = [as_run_record(source) for source in sources]
    swept = [run for run in runs if applies is None or applies(run)]
    references = [run for run in runs if applies is not None and not applies(run)]
    points = sweep_points(swept, parameter, metric)
    if not points:
        raise ConfigError(f"no run has both config.{parameter} and final dev metrics; expected completed runs")
    fig, (ax,) = new_figure()
    xs = []
    for label, by_x in points.items():
        x = np.array(sorted(by_x))
        mean = np.array([np.mean(by_x[v]) for v in x])
        spread = np.array([np.std(by_x[v]) if len(by_x[v]) > 1 else 0.0 for v in x])
        style = optimizer_style(label)
        ax.plot(x, mean, label=label, **style)
        if spread.any():  # the seed band: mean ± standard deviation over seeds
            ax.fill_between(x, mean - spread, mean + spread, color=style["color"], alpha=0.18, linewidth=0)
        seeds_x = [v for v in x for _ in by_x[v]]
        seeds_y = [value for v in x for value in by_x[v]]
        ax.scatter(seeds_x, seeds_y, s=6, color=style["color"], alpha=0.45, linewidths=0)  # every seed, faint
        xs.extend(x)
    for label, by_x in sweep_points(references, parameter, metric).items():
        value = np.mean([v for values in by_x.values() for v in values])
        style = optimizer_style(label)
        ax.axhline(value, color=style["color"], linestyle=":", linewidth=1.0, label=f"{label} (reference)")
    if parameter != "sparsity":
        apply_scale(ax, "x", finite(xs), decades=1.0)
    names = sorted({metric or run.metric_name for run in swept if (metric or run.metric_name)})
    ax.set_xlabel(SWEEP_LABELS.get(parameter, parameter))
    ax.set_ylabel("dev " + " / ".join(names))
    ax.set_title(" / ".join(sorted({run.task for run in runs})))
    ax.legend(loc="best")
    return fig


def metric_vs_sparsity(sources: Sequence[RunSource], *, metric: str | None = None) -> Figure:
    """FSAM Fig. 1 (left) / Table 4: dev metric against the Fisher-mask sparsity s of FSAM runs."""
    return metric_vs_hyperparameter(sources, "sparsity", metric=metric, applies=lambda run: run.uses_fisher_mask)


def metric_vs_mask_interval(sources: Sequence[RunSource], *, metric: str | None = None) -> Figure:
    """FSAM Fig. 1 (right) / Table 4: dev metric against the mask refresh interval F_i of FSAM runs."""
    return metric_vs_hyperparameter(sources, "mask_interval", metric=metric, applies=lambda run: run.uses_fisher_mask)


def metric_vs_train_fraction(sources: Sequence[RunSource], *, metric: str | None = None) -> Figure:
    """FSAM Fig. 2 / Bahri et al. Fig. 1: dev metric against the fraction of the training set used."""
    return metric_vs_hyperparameter(sources, "train_fraction", metric=metric)


def metric_vs_sam_setting(sources: Sequence[RunSource], parameter: str, *, metric: str | None = None) -> Figure:
    """Bahri et al. Fig. 2: dev metric against a SAM hyperparameter (ρ, a/b, m, β) of the sharpness-aware runs;
    runs of the base optimizer alone are dotted references."""
    return metric_vs_hyperparameter(
        sources, parameter, metric=metric, applies=lambda run: run.config.get("sam", "none") != "none"
    )


#: config keys that do not make two runs different settings (seeds of one setting differ only in these)
NOT_A_SETTING = ("seed", "out", "data_dir", "device", "recipe")


def seed_groups(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs that differ only in their seed, keyed by a legend name: the optimizer label, plus the settings that
    vary between runs of that label (e.g. ``adamw+sam rho=0.1``)."""

    def setting(run: RunRecord) -> tuple:
        return tuple(sorted((k, json_key(v)) for k, v in run.config.items() if k not in NOT_A_SETTING))

    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault((run.label, setting(run)), []).append(run)
    named: dict[str, list[RunRecord]] = {}
    for (label, key), members in groups.items():
        siblings = [k for (other, k) in groups if other == label]
        varying = sorted(
            {name for k in siblings for name, value in k if any(dict(o).get(name) != value for o in siblings)}
        )
        extra = " ".join(f"{name}={dict(key).get(name)}" for name in varying)
        named[f"{label} {extra}".strip()] = members
    return named


def json_key(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


@styled
def dev_metric_bands(sources: Sequence[RunSource], *, metric: str | None = None) -> Figure:
    """FSAM Fig. 6 over seeds: the dev metric against step for each group of runs that differ only in their seed
    (:func:`seed_groups`): the mean at each evaluated step, the band ± the standard deviation over seeds, each
    seed faint."""
    runs = [as_run_record(source) for source in sources]
    fig, (ax,) = new_figure()
    groups, names = _evaluated_groups(runs, metric)
    if not groups:
        raise ConfigError("no run has dev evaluations in metrics.jsonl; train with --eval-every N")
    if all(len(steps) == 1 for _, _, steps, _ in groups):
        return _final_metric_strip(fig, ax, groups, names, runs)
    colours_used: dict[str, int] = {}
    for group, members, steps, values in groups:
        style = optimizer_style(members[0].label)
        # Groups of one variant (SAM and efficient SAM) share its colour: tell them apart by the line's dash.
        repeat = colours_used[style["color"]] = colours_used.get(style["color"], -1) + 1
        style = {**style, "linestyle": ("-", "--", ":", "-.")[repeat % 4]}
        for row in values:
            ax.plot(steps, row, color=style["color"], alpha=0.25, linewidth=0.6)
        mean = values.mean(axis=0)
        ax.plot(steps, mean, label=f"{group} (n = {len(values)})", **{**style, "marker": None})
        if len(values) > 1:
            spread = values.std(axis=0)
            ax.fill_between(steps, mean - spread, mean + spread, color=style["color"], alpha=0.18, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel("dev " + " / ".join(sorted(names)))
    ax.set_title(" / ".join(sorted({run.task for run in runs})))
    ax.legend(loc="best", fontsize="x-small")
    return fig


def _evaluated_groups(runs, metric) -> tuple[list[tuple[str, list, list[int], np.ndarray]], set[str]]:
    """(group, its runs, the evaluated steps all its seeds share, values [seeds, steps]) of every seed group, and
    the names of the metrics they read."""
    groups, names = [], set()
    for group, members in seed_groups(runs).items():
        series = {}
        for run in members:
            name = metric or run.metric_name
            if not name:
                continue
            names.add(name)
            points = {int(r["step"]): float(r[name]) for r in run.records_of("eval") if name in r and "step" in r}
            if points:
                series[run.path] = points
        steps = sorted(set.intersection(*(set(p) for p in series.values()))) if series else []
        if steps:
            groups.append((group, members, steps, np.array([[p[t] for t in steps] for p in series.values()])))
    return groups, names


def _final_metric_strip(fig, ax, groups, names, runs) -> Figure:
    """Runs evaluated once (at the end): no curve to draw; each group's seeds as dots and their mean ± std."""
    for x, (_, members, _, values) in enumerate(groups):
        style = optimizer_style(members[0].label)
        finals = values[:, 0]
        ax.scatter(np.full(len(finals), x), finals, color=style["color"], alpha=0.45, s=14, linewidths=0)
        spread = finals.std() if len(finals) > 1 else 0.0
        ax.errorbar([x], [finals.mean()], yerr=[spread], color=style["color"], marker="o", capsize=3, markersize=5)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{group}\n(n = {len(values)})" for group, _, _, values in groups], fontsize="xx-small",
                       rotation=25, ha="right")  # fmt: skip
    ax.set_ylabel("final dev " + " / ".join(sorted(names)))
    ax.set_title(" / ".join(sorted({run.task for run in runs})) + "\none evaluation per run: mean ± std over seeds",
                 fontsize="small")  # fmt: skip
    return fig
