"""Figures of the analyses on checkpoints: Hessian spectra, Fisher distributions (FSAM Fig. 3-style per-layer view),
sharpness against ρ, and cross-task transfer bars (FSAM Fig. 3)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from figures.sources import ResultRecord, as_result_record, legend_labels
from figures.style import PANEL_HEIGHT_IN, apply_scale, finite, new_figure, optimizer_colour, optimizer_style, styled
from landscape.core.results import Result

Source = ResultRecord | Result | str | os.PathLike[str]
SHOWN_QUANTILES = (0.1, 0.5, 0.9, 0.99)  # of a Fisher result's quantile levels, those drawn (all if none of these)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


@styled
def hessian_spectrum(sources: Sequence[Source]) -> Figure:
    """Top Hessian eigenvalues and spectral density of several runs. Top panel: x = rank (1 = largest), y = eigenvalue
    (log or symlog scale when they span two decades; hollow markers = not converged). Bottom panel, when a result has
    an SLQ density: x = eigenvalue λ, y = density on a log scale."""
    records = [as_result_record(source, "hessian") for source in sources]
    with_density = [r for r in records if "density" in r.arrays and "density_grid" in r.arrays]
    fig, axes = new_figure(2 if with_density else 1, 1)
    labels = legend_labels(records)
    eigen_ax = axes[0]
    everything = []
    for record, label in zip(records, labels, strict=True):
        values = finite(record.arrays["eigenvalues"])
        converged = np.asarray(record.arrays.get("converged", np.ones(len(values), bool)), dtype=bool)
        order = np.argsort(-np.nan_to_num(values, nan=-np.inf))
        values, converged = values[order], converged[order]
        rank = np.arange(1, len(values) + 1)
        style = optimizer_style(record.label)
        eigen_ax.plot(rank, values, label=label, **style)
        if (~converged).any():
            eigen_ax.plot(
                rank[~converged],
                values[~converged],
                linestyle="none",
                marker=style["marker"],
                markerfacecolor="white",
                markeredgecolor=style["color"],
            )
        everything.append(values)
    apply_scale(eigen_ax, "y", np.concatenate(everything) if everything else [])
    eigen_ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ranks are whole numbers
    eigen_ax.set_xlabel("rank (1 = largest)")
    eigen_ax.set_ylabel("Hessian eigenvalue λ")
    eigen_ax.set_title(" / ".join(sorted({r.task for r in records})))
    eigen_ax.legend(loc="best")
    if with_density:
        density_ax = axes[1]
        for record in with_density:
            grid = finite(record.arrays["density_grid"])
            density = finite(record.arrays["density"])
            density[density <= 0] = np.nan  # a log axis cannot show zero; leave a gap
            style = optimizer_style(record.label)
            style.pop("marker")
            density_ax.plot(grid, density, label=record.label, **style)
        density_ax.set_yscale("log")
        density_ax.set_xlabel("eigenvalue λ")
        density_ax.set_ylabel("spectral density")
    return fig


def _short_names(names: Sequence[str]) -> list[str]:
    """Layer names without their common dotted prefix (``bert.encoder.layer.3`` → ``layer.3``)."""
    parts = [str(name).split(".") for name in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


@styled
def fisher_distributions(source: Source) -> Figure:
    """Empirical Fisher information of one checkpoint (FSAM Sec. 3): (a) histograms over log10 F per module type
    (counts on a log scale); (b) per-layer quantiles of F (y on a log scale); (c) each layer's share of the FSAM mask
    (top 1 − s coordinates by F), bars summing to 1."""
    record = as_result_record(source, "fisher")
    arrays = record.arrays
    fig, (hist_ax, quantile_ax, share_ax) = new_figure(3, 1, height=PANEL_HEIGHT_IN * 3 * 0.9)
    edges = finite(arrays["hist_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    module_types = [str(t) for t in arrays["module_types"]]
    palette = colormaps["tab10"]
    for index, (module, counts) in enumerate(
        zip(module_types, np.asarray(arrays["module_hist"], dtype=float), strict=True)
    ):
        if counts.sum() == 0:
            continue
        shown = counts.copy()
        shown[shown <= 0] = np.nan
        hist_ax.step(centres, shown, where="mid", color=palette(index % 10), label=module, linewidth=1.0)
    hist_ax.set_yscale("log")
    hist_ax.set_xlabel("log10 Fisher value F")
    hist_ax.set_ylabel("parameters")
    hist_ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=6)
    zeros = int(np.sum(arrays["zero_count_layer"])) if "zero_count_layer" in arrays else 0
    if zeros:  # a log histogram cannot show F = 0
        hist_ax.set_xlabel(f"log10 Fisher value F (+ {zeros:,} zeros not shown)")
    sparsity = record.meta.get("sparsity")
    fig.suptitle(f"{record.label} · {record.task}" + (f" · s = {sparsity}" if sparsity is not None else ""))

    layers = _short_names([str(n) for n in arrays["layer_names"]])
    position = np.arange(len(layers))
    quantiles = finite(arrays["layer_quantiles"])
    levels = finite(arrays["quantile_levels"])
    shown = [k for k, level in enumerate(levels) if np.isclose(level, SHOWN_QUANTILES).any()] or range(len(levels))
    quantiles, levels = quantiles[:, list(shown)], levels[list(shown)]
    shades = colormaps["viridis"](np.linspace(0.1, 0.9, max(len(levels), 1)))
    for column, level in enumerate(levels):
        quantile_ax.plot(position, quantiles[:, column], color=shades[column], marker="o", label=f"q = {level:g}")
    if apply_scale(quantile_ax, "y", quantiles[quantiles > 0]) == "log":
        for line in quantile_ax.get_lines():  # a quantile of exactly 0 is a gap on the log axis, not a clipped point
            y = np.asarray(line.get_ydata(), dtype=float)
            line.set_ydata(np.where(y > 0, y, np.nan))
    quantile_ax.set_ylabel("Fisher value F")
    quantile_ax.legend(loc="best", ncol=2, fontsize=6)

    share = finite(arrays["layer_mask_share"])
    share_ax.bar(position, np.nan_to_num(share, nan=0.0), color=optimizer_colour(record.label), width=0.7)
    share_ax.set_ylabel("share of the mask")
    share_ax.set_xlabel("layer")
    quantile_ax.set_xticks(position, [""] * len(layers))  # the names are under the bars below
    share_ax.set_xticks(position, layers, rotation=60, ha="right", fontsize=6)
    return fig


@styled
def sharpness_vs_rho(sources: Sequence[Source]) -> Figure:
    """Sharpness of several runs against the radius: ε-sharpness max_{‖ε‖≤ρ} L(θ+ε) − L(θ) by one ascent step and by
    projected gradient ascent, and adaptive sharpness, each against ρ (x on a log scale when ρ spans a decade); and
    average sharpness E L(θ+σz) − L(θ) against σ with standard-error bars."""
    records = [as_result_record(source, "sharpness") for source in sources]
    panels = [
        ("rho", "eps_sharpness_ascent", None, "ρ", "ε-sharpness (1 step)"),
        ("rho", "eps_sharpness_pgd", None, "ρ", "ε-sharpness (PGD)"),
        ("rho", "adaptive_sharpness", None, "ρ", "adaptive sharpness"),
        ("sigma", "average_sharpness", "average_sharpness_se", "σ", "average sharpness"),
    ]
    panels = [p for p in panels if any(p[1] in r.arrays and np.isfinite(finite(r.arrays[p[1]])).any() for r in records)]
    if not panels:
        fig, (ax,) = new_figure()
        _no_data(ax, "no sharpness values computed")
        return fig
    fig, axes = new_figure(len(panels), 1, height=PANEL_HEIGHT_IN * len(panels) * 0.75)
    labels = legend_labels(records)
    for ax, (x_name, y_name, se_name, x_label, y_label) in zip(axes, panels, strict=True):
        xs, ys = [], []
        for record, label in zip(records, labels, strict=True):
            if y_name not in record.arrays:
                continue
            x, y = finite(record.arrays[x_name]), finite(record.arrays[y_name])
            error = finite(record.arrays[se_name]) if se_name and se_name in record.arrays else None
            ax.errorbar(x, y, yerr=error, label=label, capsize=2, **optimizer_style(record.label))
            xs.append(x)
            ys.append(y)
        apply_scale(ax, "x", np.concatenate(xs), decades=1.0)
        apply_scale(ax, "y", np.concatenate(ys))
        ax.axhline(0, color="0.7", linewidth=0.5, zorder=0)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
    axes[0].legend(loc="best")
    axes[0].set_title(" / ".join(sorted({r.task for r in records})))
    return fig


@styled
def transfer_bars(sources: Sequence[Source]) -> Figure:
    """FSAM Fig. 3: cross-task transfer. x = target task (its metric in brackets); grouped bars = the target metric
    reached from the pretrained model (grey) and from each fine-tuned source run (coloured by optimizer)."""
    records = [as_result_record(source, "transfer") for source in sources]
    targets: list[str] = []
    metric_of: dict[str, str] = {}
    for record in records:
        for target, metric in zip(record.arrays["targets"], record.arrays["metric_names"], strict=True):
            if str(target) not in targets:
                targets.append(str(target))
                metric_of[str(target)] = str(metric)
    pretrained: dict[str, list[float]] = {t: [] for t in targets}
    for record in records:
        for target, value in zip(record.arrays["targets"], finite(record.arrays["from_pretrained"]), strict=True):
            if np.isfinite(value):
                pretrained[str(target)].append(float(value))
    series = [("pretrained", "#BBBBBB", [np.mean(pretrained[t]) if pretrained[t] else np.nan for t in targets])]
    labels = legend_labels(records)
    for record, label in zip(records, labels, strict=True):
        by_target = dict(
            zip([str(t) for t in record.arrays["targets"]], finite(record.arrays["from_source"]), strict=True)
        )
        source_task = record.run.get("task", "?")
        series.append(
            (f"{label} from {source_task}", optimizer_colour(record.label), [by_target.get(t, np.nan) for t in targets])
        )
    fig, (ax,) = new_figure(height=2.6)
    width = 0.8 / len(series)
    position = np.arange(len(targets))
    for index, (name, colour, values) in enumerate(series):
        values = np.asarray(values, dtype=float)
        offsets = position - 0.4 + width * (index + 0.5)
        ax.bar(offsets, values, width=width, color=colour, label=name, edgecolor="black", linewidth=0.3)
        for x in offsets[~np.isfinite(values)]:
            ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=5, rotation=90)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(position, [f"{t}\n({metric_of[t]})" for t in targets])
    ax.set_ylabel("target dev metric")
    ax.set_xlabel("target task")
    ax.legend(loc="best", fontsize=6)
    return fig
